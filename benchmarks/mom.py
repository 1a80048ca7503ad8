"""MoM benchmark: Liger Attention over MoM vs over GLA at the same token budget, and MoM kernel timings on a GPU.

Quality (default; CPU is fine, about twice the demo's time): ``examples/mom.yaml`` (SmolLM2-135M, liger_attention
over MoM with M = 4, k = 2 and a shared memory) and the same plan with ``recurrent: gla`` (``copy_qkvo``), i.e. the
demo's recipe and budget. Both are converted, recovered with ``surgery.recover`` and measured on the 20 held-out
512-token windows: token perplexity, perplexity at positions >= 256, and, for MoM, the tokens each memory of each
layer received on those windows::

    python benchmarks/mom.py [--plan examples/mom.yaml] [--out runs/bench-mom] [--budget 1.0]

Speed (``--gpu``): one layer at the Llama-3-8B attention shape (C = 4096, 32 query heads, 8 kv heads, D = 128,
bf16), MoM (M = 4, k = 2, shared memory, GLA memories) vs GLA: forward + backward over 32K tokens (as one sequence and
as 8 x 4K), then decode time per step after prefilling several context lengths (constant in the context: the
state does not grow)::

    python benchmarks/mom.py --gpu [--tokens 32768] [--contexts 1024,8192,32768] [--batch 1,16]

Not part of CI. Writes ``<out>/results.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402
from benchmarks.recovery import heldout_windows, token_ppl  # noqa: E402
from surgery.attention import AttentionDims, AttentionSite  # noqa: E402
from surgery.mixer import MixContext  # noqa: E402
from surgery.plugins.mom import MoM  # noqa: E402
from surgery.registry import load_registry  # noqa: E402

# -- quality -------------------------------------------------------------------------------------------------------


def gla_twin(raw: dict[str, Any]) -> dict[str, Any]:
    """The same plan with GLA as the recurrent branch (the demo's mixer) and copy_qkvo: same recipe, same budget."""
    raw = json.loads(json.dumps(raw))
    for rule in raw["convert"]:
        rule["options"]["recurrent"] = {"mixer": "gla", "options": {"gate_normalizer": 16}}
        rule["options"]["w_rec"] = 0.5  # Liger's; the MoM plan halves it (see examples/mom.yaml)
        rule["weights"] = "copy_qkvo"
        rule.pop("weight_options", None)
    raw["output"] = str(Path(raw.get("output", "runs/x")).with_name("smollm2-liger-gla"))
    return raw


def scale_budget(raw: dict[str, Any], factor: float) -> dict[str, Any]:
    raw = json.loads(json.dumps(raw))
    for options in (raw.get("recover", {}).get("stages") or {}).values():
        if isinstance(options, dict) and "tokens" in options:
            options["tokens"] = int(options["tokens"] * factor)
            options["save_steps"] = max(1, int(options.get("save_steps", 100) * factor))
    return raw


def memory_counts(model: torch.nn.Module) -> list[list[int]]:
    """Tokens per memory of every MoM in ``model``, in layer order."""
    return [m.routing_counts().tolist() for m in model.modules() if isinstance(m, MoM)]


def quality(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery import demo

    model_dir, data = demo.prepare_demo()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = base.to(device)
    windows = heldout_windows(data, tokenizer)
    rows: dict[str, Any] = {"base": token_ppl(base, windows)}
    raw_mom = scale_budget(yaml.safe_load(Path(args.plan).read_text()), args.budget)
    raw_mom["model"] = str(model_dir)
    for name, raw in (("liger-gla", gla_twin(raw_mom)), ("liger-mom", raw_mom)):
        out = Path(args.out) / name
        plan = surgery.load_plan(raw)
        t0 = time.perf_counter()
        model = surgery.convert(plan)
        result = surgery.recover(model, plan, tokenizer=tokenizer, out_dir=out / "recover", teacher_model=base)
        model = result.model.to(device).eval()
        for m in model.modules():
            if isinstance(m, MoM):
                m.reset_routing_counts()
        row = {"tokens": result.tokens, "steps": result.steps, "train_s": round(time.perf_counter() - t0, 1)}
        row.update(token_ppl(model, windows))
        counts = memory_counts(model)
        if counts:
            row["tokens_per_memory"] = counts
        rows[name] = row
        print(json.dumps({name: {k: v for k, v in row.items() if k != "tokens_per_memory"}}), flush=True)
    lines = ["| model | recovery tokens | ppl | ppl pos >= 256 |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r.get('tokens', 0)} | {r['ppl']:.3f} | {r['ppl_pos256']:.3f} |")
    if "tokens_per_memory" in rows["liger-mom"]:
        lines += ["", "| layer | tokens per memory (held-out windows) | max / mean |", "|---|---|---|"]
        for i, c in enumerate(rows["liger-mom"]["tokens_per_memory"]):
            lines.append(f"| {i} | {c} | {max(c) / max(sum(c) / len(c), 1e-9):.2f} |")
    print("\n".join(lines))
    return rows


# -- speed -------------------------------------------------------------------------------------------------------

LLAMA3_8B = AttentionDims(hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, qkv_bias=False,
                          o_bias=False, scaling=128**-0.5)  # fmt: skip


def build(name: str, options: dict[str, Any]) -> torch.nn.Module:
    registry = load_registry()
    cls = registry.mixer(name)
    site = AttentionSite(0, "bench.self_attn", "Bench", LLAMA3_8B, "separate")
    opts = cls.Options.model_validate(options, context={"registry": registry})
    return cls(site, cls.resolve_options(site, opts), None).to("cuda", torch.bfloat16)


def cuda_time(fn: Any, repeat: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` runs after two warm-ups (Triton compiles on the first)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def speed(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import DynamicCache

    variants = {"gla": ("gla", {}), "mom": ("mom", {"num_memories": 4, "topk": 2, "shared_memory": True})}
    ctx = MixContext(None, None, None, None, {})
    rows: dict[str, Any] = {}
    for label, (name, options) in variants.items():
        mixer = build(name, options).train()
        rows[label] = {"train_ms": {}, "decode_ms": {}}
        for B in (1, 8):
            T = args.tokens // B
            x = torch.randn(B, T, LLAMA3_8B.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)

            def step() -> None:
                y = mixer.mix(x, ctx)
                loss = y.float().square().mean() + (mixer.aux_loss if mixer.aux_loss is not None else 0)
                loss.backward()
                mixer.aux_loss = None

            rows[label]["train_ms"][f"{B}x{T}"] = cuda_time(step, args.repeat)
            torch.cuda.empty_cache()
        mixer.eval()
        for B in args.batch:
            for context in args.contexts:
                with torch.no_grad():
                    cache = DynamicCache()
                    prefill = torch.randn(B, context, LLAMA3_8B.hidden_size, device="cuda", dtype=torch.bfloat16)
                    mixer.mix(prefill, MixContext(None, None, None, cache, {}))
                    one = torch.randn(B, 1, LLAMA3_8B.hidden_size, device="cuda", dtype=torch.bfloat16)
                    step_ctx = MixContext(None, None, None, cache, {})
                    rows[label]["decode_ms"][f"B{B}@{context}"] = cuda_time(lambda: mixer.mix(one, step_ctx), 50)
                del cache, prefill
                torch.cuda.empty_cache()
        print(json.dumps({label: rows[label]}), flush=True)
    lines = ["| workload | gla ms | mom ms | mom / gla |", "|---|---|---|---|"]
    for kind in ("train_ms", "decode_ms"):
        for key, g in rows["gla"][kind].items():
            m = rows["mom"][kind][key]
            lines.append(f"| {'fwd+bwd' if kind == 'train_ms' else 'decode step'} {key} | {g:.3f} | {m:.3f} | "
                         f"{m / g:.2f} |")  # fmt: skip
    print("\n".join(lines))
    return {"device": torch.cuda.get_device_name(), "shape": "llama-3-8b attention, bf16", **rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", default="examples/mom.yaml", help="the MoM plan; its GLA twin is derived from it")
    ap.add_argument("--out", default="runs/bench-mom", help="output directory")
    ap.add_argument("--budget", type=float, default=1.0, help="multiple of the plan's recovery token budget")
    ap.add_argument("--gpu", action="store_true", help="time one Llama-3-8B-shaped layer instead (needs CUDA)")
    ap.add_argument("--tokens", type=int, default=32768, help="--gpu: tokens per fwd+bwd")
    ap.add_argument("--contexts", default="1024,8192,32768", help="--gpu: prefill lengths before decoding")
    ap.add_argument("--batch", default="1,16", help="--gpu: decode batch sizes")
    ap.add_argument("--repeat", type=int, default=10, help="--gpu: timed fwd+bwd runs")
    args = ap.parse_args()
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.batch = [int(b) for b in args.batch.split(",")]
    if args.gpu and not torch.cuda.is_available():
        print("--gpu needs a CUDA device", file=sys.stderr)
        return 2
    results = speed(args) if args.gpu else quality(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("speed.json" if args.gpu else "results.json")).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
