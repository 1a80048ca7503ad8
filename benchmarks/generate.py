"""Whole-model decoding: converted models (static cache, eager vs captured) against the base model's fastest
transformers path (StaticCache + torch.compile reduce-overhead), in one run.

Default shape: Llama-3-8B from a config (random bf16 weights; 32 layers, hidden 4096, 32 q / 8 kv heads, head dim
128, intermediate 14336, vocab 128256). Converted: gla, liger_attention (window 64) and ``memory``, the main job's
recipe (``examples/demo.yaml``: window 64, 4 sinks, a 512-pair retrieval memory, ``w_rec: 0``); ``--mixers`` takes
mixer names, rules and example plans (``benchmarks/conversions.py``). Batches 1, 8, 64; contexts 2K .. 128K. Per
point: decode tok/s (new tokens of all rows per second, prefill excluded) and peak memory.

    python benchmarks/generate.py --out benchmarks/results/generate-h200.jsonl            # the full grid
    python benchmarks/generate.py --modes graph compile --batch 8 --context 2048 32768    # compile vs graph
    python benchmarks/generate.py --tiny                                                  # CPU, CI
    python benchmarks/generate.py --mixers gla memory=examples/demo.yaml --batch 8        # the memory recipe

Context for converted models: the decode state has the same size at any context, so a step's work does not depend
on it; by default the prompt is 16 tokens and the decoder is then moved to position L (RoPE positions and counters),
which times the step at context L without paying an L-token prefill. ``--real-prefill`` prefills L tokens instead
(slow at 128K x 64). The base always prefills for real (its step reads an L-long KV cache); points whose KV cache
does not fit in memory are recorded as skipped.

One JSON line per point (``--out``), a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402
from benchmarks.conversions import MEMORY, Conversion, parse_all  # noqa: E402
from surgery.generate import Decoder  # noqa: E402
from surgery.registry import load_registry  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072 + 4096,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)  # fmt: skip
#: A bare mixer name's options here.
MIXERS = {"gla": {}, "liger_attention": {"window": 64}}
CONVERSIONS = [*MIXERS, MEMORY]


def build(cfg_kwargs: dict[str, Any], dtype: torch.dtype, device: str, seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(**cfg_kwargs)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def convert(model: Any, mixer: Conversion | str) -> Any:
    """``model`` converted by ``mixer``: a ``Conversion`` or a mixer name (with its ``MIXERS`` options)."""
    registry = load_registry(autoload=False)
    if isinstance(mixer, str):
        mixer = Conversion(mixer, [{"layers": "all", "mixer": mixer, "options": MIXERS.get(mixer, {})}])
    plan = surgery.load_plan(mixer.plan(), registry)
    return surgery.convert(plan, model).to(dtype=next(model.parameters()).dtype)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def reset_peak(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_converted(model: Any, batch: int, context: int, new: int, mode: str, device: str, real_prefill: bool,
                   vocab: int) -> dict[str, Any]:  # fmt: skip
    prompt_len = context if real_prefill else min(16, context)
    ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
    dec = Decoder(model, batch, capture=mode)
    t0 = time.perf_counter()
    dec.prefill(ids)
    sync(device)
    prefill_s = time.perf_counter() - t0
    if not real_prefill and context > prompt_len:  # move to position `context` (see the module docstring)
        dec.pos.fill_(context)
        for layer in dec.cache.layers:
            layer.seen = context
    for _ in range(3):  # warm-up; the first captured call also records the graph
        dec.step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(new):
        dec.step()
    sync(device)
    dt = time.perf_counter() - t0
    dec.close()
    return {"tok_per_s": batch * new / dt, "ms_per_step": 1000 * dt / new, "prefill_s": prefill_s,
            "ran_as": dec.mode, "cache_gb": dec.cache.nbytes() / 2**30}  # fmt: skip


class _StepClock:
    """A logits processor that timestamps every decoding step (after a device sync)."""

    def __init__(self, device: str) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def time_base(model: Any, batch: int, context: int, new: int, mode: str, device: str, vocab: int) -> dict[str, Any]:
    """transformers' generate: ``mode="eager"`` with its default cache; ``"compile"`` with cache_implementation
    static, which compiles the decode step (reduce-overhead) on CUDA: the fastest path transformers supports."""
    from transformers import LogitsProcessorList

    ids = torch.randint(3, vocab, (batch, context), device=device)
    kw: dict[str, Any] = dict(max_new_tokens=new + 1, min_new_tokens=new + 1, do_sample=False, pad_token_id=0)
    if mode == "compile":
        kw["cache_implementation"] = "static"
    else:
        kw["disable_compile"] = True
    with torch.no_grad():
        if mode == "compile":
            # Compile and capture with exactly the timed call's arguments: a warm-up of another length gives the
            # static cache another size, and the timed call would recompile (seconds per step).
            model.generate(ids, logits_processor=LogitsProcessorList([_StepClock(device)]), **kw)
        clock = _StepClock(device)
        model.generate(ids, logits_processor=LogitsProcessorList([clock]), **kw)
    steps = len(clock.times) - 1  # first timestamp: after the prefill
    dt = clock.times[-1] - clock.times[0]
    # transformers compiles only on accelerators: on CPU "compile" is its StaticCache path, uncompiled
    return {"tok_per_s": batch * steps / dt, "ms_per_step": 1000 * dt / steps,
            "compiled": mode == "compile" and device == "cuda"}


def kv_gb(cfg: dict[str, Any], batch: int, length: int) -> float:
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2 * batch * length / 2**30


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer tiny Llama in fp32 (CPU, tests)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    ap.add_argument("--new-tokens", type=int, default=64, help="timed decode steps per point")
    ap.add_argument("--mixers", nargs="*", default=CONVERSIONS, metavar="SPEC",
                    help="mixer names, rules ({mixer: NAME, options: {...}}) or example plans, LABEL=SPEC to name "
                         "the row (default: gla, liger_attention and memory=examples/demo.yaml)")
    ap.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph", "compile"],
                    help="converted models: decode step eager, CUDA graph, or torch.compile reduce-overhead")
    ap.add_argument("--base-modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile", "none"],
                    help="base: transformers eager (DynamicCache) and/or StaticCache + torch.compile")
    ap.add_argument("--real-prefill", action="store_true", help="converted models prefill the whole context")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="append one JSON line per point")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = TINY if args.tiny else LLAMA3_8B
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        torch.set_num_threads(1)  # tiny tensors: a second thread costs more than it gives
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else float("inf")
    meta = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "shape": "tiny" if args.tiny else "llama3-8b",
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    rows: list[dict[str, Any]] = []
    out = Path(args.out) if args.out else None

    def emit(row: dict[str, Any]) -> None:
        row = {**meta, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")

    points = [(b, c) for b in args.batch for c in args.context]
    conversions = {c.label: c for c in parse_all(args.mixers, MIXERS)}
    for name in ["base", *conversions]:
        reset_peak(device)
        model = build(cfg, dtype, device)
        weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        if name != "base":
            model = convert(model, conversions[name])
        modes = [m for m in args.base_modes if m != "none"] if name == "base" else args.modes
        for mode in modes:
            for b, c in points:
                where = {"model": name, "mode": mode, "batch": b, "context": c}
                if name == "base" and weights_gb + 1.15 * kv_gb(cfg, b, c + args.new_tokens + 8) > 0.9 * total:
                    emit({**where, "skipped": f"KV cache {kv_gb(cfg, b, c):.0f} GB does not fit"})
                    continue
                reset_peak(device)
                try:
                    if name == "base":
                        r = time_base(model, b, c, args.new_tokens, mode, device, cfg["vocab_size"])
                    else:
                        r = time_converted(model, b, c, args.new_tokens, mode, device, args.real_prefill,
                                           cfg["vocab_size"])  # fmt: skip
                    emit({**where, **r, "peak_gb": peak_gb(device)})
                except Exception as exc:  # noqa: BLE001 - one failing point must not lose the others
                    if device == "cuda" and isinstance(exc, torch.OutOfMemoryError):
                        torch.cuda.empty_cache()
                    emit({**where, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        del model
    _table(rows)
    return rows


def _table(rows: list[dict[str, Any]]) -> None:
    print("\n| model | mode | batch | context | tok/s | ms/step | peak GB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "tok_per_s" in r:
            pk = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "-"
            mode = r["mode"] if r.get("ran_as", r["mode"]) == r["mode"] else f"{r['mode']} (ran {r['ran_as']})"
            print(f"| {r['model']} | {mode} | {r['batch']} | {r['context']} | {r['tok_per_s']:.0f} | "
                  f"{r['ms_per_step']:.2f} | {pk} |")
        else:
            mode = r["mode"] if r.get("ran_as", r["mode"]) == r["mode"] else f"{r['mode']} (ran {r['ran_as']})"
            print(f"| {r['model']} | {mode} | {r['batch']} | {r['context']} | "
                  f"{r.get('skipped') or r.get('error')} | | |")


if __name__ == "__main__":
    main()
