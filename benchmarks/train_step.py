"""Whole-model training step, base model vs each converted mixer: tokens/s and peak memory, as ratios to the base.

A LoRA-like step: every weight frozen, the gradient taken w.r.t. ``inputs_embeds`` (so every layer's backward runs,
activations included, but no weight gradient is kept), batch 1. The decoder body runs (``model.model``); the LM head
and the loss are left out because they are the same for every variant and, at a 128K vocabulary and 32K tokens,
would dominate the memory being compared. The loss is the mean square of the last hidden states.

On CUDA the model has the Llama-3-8B shape (32 layers, hidden 4096, 32 query / 8 key-value heads, head dim 128,
MLP 14336, bf16) with random weights from a ``LlamaConfig``, at T = 4K, 16K and 32K. ``--tiny`` runs a 2-layer tiny
Llama at T = 64 on the CPU (fp32), so that CI can call it.

Converted layers recompute their token mixing in the backward on CUDA (``Mixer.recompute``, the training default);
``--stored`` adds a row per mixer that keeps those activations instead.

``--mixers`` takes mixer names, rules and example plans (``benchmarks/conversions.py``): ``gla``,
``'{mixer: liger_attention, options: {window: 64, memory: 512}}'``, ``examples/liger-gla.yaml``, each optionally
labelled ``LABEL=SPEC``. The default rows are the four mixers and ``memory``, the main job's recipe
(``examples/demo.yaml``: window 64, 4 sinks, a 512-pair retrieval memory, ``w_rec: 0``).

    python benchmarks/train_step.py [--tiny] [--lengths 4096 16384] [--mixers gla memory=examples/demo.yaml]
                                    [--stored] [--profile] [--steps 3] [--out r.json]
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
from surgery.mixer import Mixer  # noqa: E402

MIXERS = ["gla", "hgrn2", "gsa", "liger_attention"]
#: The default rows (``--mixers``): the mixers with their default options, and the main job's memory recipe.
CONVERSIONS = [*MIXERS, MEMORY]


def llama_config(tiny: bool, max_len: int) -> Any:
    """The Llama-3-8B shape, or a 2-layer tiny Llama for ``--tiny``."""
    from transformers import LlamaConfig

    if tiny:
        # head dim 64: GSA's default 64 slots must divide it
        return LlamaConfig(vocab_size=160, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=max_len)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                       max_position_embeddings=max_len)


def build(mixer: Conversion | str | None, tiny: bool, max_len: int, device: torch.device, dtype: torch.dtype,
          recompute: bool | None = None) -> Any:
    """A freshly initialised model (same seed every time), converted by ``mixer`` (a ``Conversion``, or a mixer
    name) unless None, all weights frozen; ``recompute`` sets every mixer's ``Mixer.recompute`` (None: the default,
    on for CUDA)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: an 8B fp32 copy would not be cheap
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(tiny, max_len))
    finally:
        torch.set_default_dtype(old)
    if mixer is not None:
        if isinstance(mixer, str):
            mixer = Conversion(mixer, [{"layers": "all", "mixer": mixer}])
        model = surgery.convert(surgery.load_plan(mixer.plan()), model)
        model.to(device=device, dtype=dtype)  # parameters the mixer created new
        for m in model.modules():
            if isinstance(m, Mixer):
                m.recompute = recompute
    model.requires_grad_(False)
    return model.train()


def step(model: Any, x: torch.Tensor) -> None:
    """One forward and backward of the decoder body w.r.t. the input embeddings."""
    x = x.detach().requires_grad_()
    h = model.model(inputs_embeds=x, use_cache=False).last_hidden_state
    (grad,) = torch.autograd.grad(h.float().square().mean(), x)
    del grad


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: Any, T: int, steps: int, warmup: int, device: torch.device,
            dtype: torch.dtype) -> dict[str, Any]:
    """Median step time, tokens/s and (CUDA) peak memory of one step, total and above the weights."""
    x = torch.randn(1, T, model.config.hidden_size, device=device, dtype=dtype)
    for _ in range(warmup):  # Triton compilation, the allocator, lazy imports
        step(model, x)
    sync(device)
    row: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(model, x)
        sync(device)
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    row["step_ms"] = sec * 1e3
    row["tok_s"] = T / sec
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row["peak_gb"] = peak / 2**30
        row["act_gb"] = (peak - before) / 2**30
    return row


def profile(model: Any, T: int, device: torch.device, dtype: torch.dtype, top: int = 20) -> str:
    """The ``top`` kernels of one step by total device time (after a warm-up step), as text."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x = torch.randn(1, T, model.config.hidden_size, device=device, dtype=dtype)
    step(model, x)
    sync(device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with torch_profile(activities=[activity]) as prof:
        step(model, x)
        sync(device)
    events = [e for e in prof.key_averages() if e.device_time_total or e.self_cpu_time_total]
    key = (lambda e: e.device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) / 1e3
    lines = [f"  kernel time {total:.1f} ms; top {top}:"]
    lines += [f"  {key(e) / 1e3:9.2f} ms {e.count:5d}x  {e.key[:100]}" for e in sorted(events, key=key)[::-1][:top]]
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["model", "T", "step_ms", "tok_s", "tok_s_vs_base", "peak_gb", "peak_vs_base", "act_gb", "act_vs_base",
            "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2-layer tiny Llama, T = 64, on the CPU")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default 4K 16K 32K)")
    ap.add_argument("--mixers", nargs="+", default=CONVERSIONS, metavar="SPEC",
                    help="mixer names, rules ({mixer: NAME, options: {...}}) or example plans, LABEL=SPEC to name "
                         "the row (default: the four mixers and memory=examples/demo.yaml)")
    ap.add_argument("--stored", action="store_true",
                    help="also run each mixer with its activations kept (Mixer.recompute = False): rows 'MIXER/stored'")
    ap.add_argument("--profile", action="store_true", help="also print each model's top kernels of one step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row (the median is reported)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.tiny:
        device, dtype, lengths = torch.device("cpu"), torch.float32, args.lengths or [64]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/train_step.py needs CUDA (or --tiny for the CPU)")
        device, dtype, lengths = torch.device("cuda"), torch.bfloat16, args.lengths or [4096, 16384, 32768]
    conversions = parse_all(args.mixers)
    rows: list[dict[str, Any]] = []
    for T in lengths:
        base: dict[str, Any] | None = None
        variants = [(m, None) for m in conversions] + ([(m, False) for m in conversions] if args.stored else [])
        for mixer, recompute in [(None, None), *variants]:
            name = (mixer.label if mixer else "base") + ("/stored" if recompute is False else "")
            row: dict[str, Any] = {"model": name, "T": T}
            if mixer is not None:
                row["convert"] = mixer.rules
            model = None
            try:
                model = build(mixer, args.tiny, max(lengths), device, dtype, recompute)
                row.update(measure(model, T, args.steps, 1 if args.tiny else 2, device, dtype))
                if args.profile:
                    print(f"{name} T={T}:\n{profile(model, T, device, dtype)}", flush=True)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as e:  # noqa: BLE001 - one broken mixer must not hide the others' rows
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if mixer is None:
                base = row
            for key, ratio in (("tok_s", "tok_s_vs_base"), ("peak_gb", "peak_vs_base"), ("act_gb", "act_vs_base")):
                if base is not None and key in row and base.get(key):
                    row[ratio] = row[key] / base[key]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every row, so that a run cut short keeps what it measured
                Path(args.out).write_text(json.dumps(rows, indent=1))
    where = f"{torch.cuda.get_device_name()}" if device.type == "cuda" else "CPU"
    print(f"\n## Training step (frozen weights, grad on inputs_embeds, batch 1), {where}, "
          f"{'tiny Llama' if args.tiny else 'Llama-3-8B shape, bf16'}\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
