"""MoM benchmark: Liger Attention over MoM vs over GLA at the same token budget, and MoM kernel timings on a GPU.

Quality (default; CPU is fine): three rows of ``benchmarks/recall.py`` measured alike: the base, ``default``
(``examples/demo-lora.yaml``: liger_attention over one GLA memory) and ``mom`` (the same recipe and token budget with
``examples/mom.yaml``'s conversion: liger_attention over MoM, M = 4, k = 2, shared memory). Columns: passkey at
1K/2K/4K and 4-key, held-out token perplexity (all positions and >= 256), next-sentence accuracy, decode memory; and
for ``mom`` the tokens each memory of each layer received on the held-out windows. ``--reuse`` copies rows already
measured (a ``recall.py`` results.json, e.g. ``benchmarks/results/recall-cpu.json``) instead of rerunning them; on
2 CPU cores the ``mom`` row takes about 30 minutes::

    python benchmarks/mom.py [--out runs/bench-mom] [--reuse benchmarks/results/recall-cpu.json]

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
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import recall  # noqa: E402
from surgery.mixer import MixContext  # noqa: E402
from surgery.registry import load_registry  # noqa: E402
from surgery.sites.attention import AttentionDims, AttentionSite  # noqa: E402

# -- quality -------------------------------------------------------------------------------------------------------


ROWS = ("base", "default", "mom")  # benchmarks/recall.py's rows: the base, the demo (liger over GLA), liger over MoM


def quality(args: argparse.Namespace) -> dict[str, Any]:
    """The three rows of benchmarks/recall.py, measured alike; rows already in ``--reuse`` are copied, not rerun."""
    out = Path(args.out)
    if args.reuse:
        recorded = json.loads(Path(args.reuse).read_text())["rows"]
        for name in ROWS:
            saved = out / name / "row.json"
            if name in recorded and not saved.exists():
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(recorded[name] | {"reused_from": args.reuse}, indent=1))
    recall.run_rows(list(ROWS), Path("examples/demo-lora.yaml"), out)
    rows = {name: json.loads((out / name / "row.json").read_text()) for name in ROWS}
    print(recall.table(rows, rows["base"]))
    counts = rows["mom"].get("tokens_per_memory", [])
    lines = ["| layer | tokens per memory (held-out windows) | max / mean |", "|---|---|---|"]
    for i, c in enumerate(counts):
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
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()  # peak above what the layer and its input hold: activations, kernel buffers
            rows[label].setdefault("train_peak_gb", {})[f"{B}x{T}"] = (torch.cuda.max_memory_allocated() - before) / 2**30
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
                rows[label].setdefault("prefill_peak_gb", {})[f"B{B}@{context}"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
                del cache, prefill
                torch.cuda.empty_cache()
        print(json.dumps({label: rows[label]}), flush=True)
    lines = ["| workload | gla ms | mom ms | mom / gla |", "|---|---|---|---|"]
    names = {"train_ms": "fwd+bwd", "decode_ms": "decode step", "train_peak_gb": "fwd+bwd peak GB",
             "prefill_peak_gb": "prefill + decode peak GB"}  # fmt: skip
    for kind, what in names.items():
        for key, g in rows["gla"].get(kind, {}).items():
            m = rows["mom"].get(kind, {}).get(key)
            if m is not None:
                lines.append(f"| {what} {key} | {g:.3f} | {m:.3f} | {m / g:.2f} |")
    print("\n".join(lines))
    return {"device": torch.cuda.get_device_name(), "shape": "llama-3-8b attention, bf16", **rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reuse", default=None, help="a recall results.json whose base/default rows to copy")
    ap.add_argument("--out", default="runs/bench-mom", help="output directory")
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
