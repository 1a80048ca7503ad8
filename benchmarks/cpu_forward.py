"""CPU forward time of converted SmolLM2 against the base model, in one run (issue: the CPU is the main job's path).

Each model runs the same forward (no grad, no cache, fp32) over a batch of ``--batch`` x ``--length`` tokens of the
demo's held-out text; the rows are timed in turns (base, plan A, plan B, base, ...) so that a busy machine slows
them alike, and the median of ``--reps`` turns is reported with its ratio to the base's, next to the median of the
per-turn ratios (each turn's time over the base's in that turn). Default plans: the main
job's (``examples/demo.yaml``: window 64 + sinks 4 + retrieval memory 512) and the LoRA recipe's conversion
(``examples/demo-lora.yaml``: Liger-GLA, window 64, both branches), untrained (speed does not depend on weights).
``--tiny`` builds a 2-layer Llama from a config instead of loading SmolLM2 (what CI runs).

    python benchmarks/cpu_forward.py [--plans examples/demo.yaml examples/demo-lora.yaml] [--batch 4]
                                     [--length 512] [--reps 5] [--threads N] [--tiny] [--out r.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.convert import convert  # noqa: E402
from surgery.plan import load_plan  # noqa: E402

PLANS = ["examples/demo.yaml", "examples/demo-lora.yaml"]


def tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def inputs(tiny: bool, batch: int, length: int, model_path: str) -> torch.Tensor:
    """``[batch, length]`` token ids: held-out demo text (random ids with ``tiny``)."""
    if tiny:
        return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0))
    from transformers import AutoTokenizer

    from surgery import demo

    tok = AutoTokenizer.from_pretrained(model_path)
    rows = [json.loads(line) for line in demo.build_data().heldout_ppl.read_text().splitlines()]
    stream = [t for r in rows for t in tok(r["text"])["input_ids"]]  # the documents end to end
    if len(stream) < batch * length:
        raise SystemExit(f"the held-out text has {len(stream)} tokens, fewer than {batch} x {length}")
    return torch.tensor(stream[: batch * length]).view(batch, length)


def models(plans: list[str], tiny: bool) -> tuple[dict[str, torch.nn.Module], str]:
    """``{"base": base, plan name: converted}`` (untrained conversions) and the model path."""
    from surgery.convert import load_model

    raws = [yaml.safe_load(Path(p).read_text()) for p in plans]
    base = tiny_llama() if tiny else load_model(load_plan(raws[0]))
    out = {"base": base}
    for path, raw in zip(plans, raws):
        raw = {k: v for k, v in raw.items() if k in ("version", "model", "dtype", "convert")}
        out[Path(path).stem] = convert(load_plan(raw), copy.deepcopy(base)).eval()
    return out, raws[0]["model"]


def run(plans: list[str], batch: int, length: int, reps: int, tiny: bool = False) -> list[dict[str, Any]]:
    """One row per model: median forward seconds over ``reps`` interleaved turns, and the ratio to the base."""
    named, model_path = models(plans, tiny)
    x = inputs(tiny, batch, length, model_path)
    times: dict[str, list[float]] = {name: [] for name in named}
    with torch.inference_mode():
        for m in named.values():  # warm-up: first-call allocations, lazy imports
            m(x[:1, :64], use_cache=False)
        for _ in range(reps):
            for name, m in named.items():
                t0 = time.perf_counter()
                m(x, use_cache=False)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["base"])
    # Per turn, each model against the base timed just before it: on a machine whose speed drifts (shared
    # cores), the median of these ratios moves less than the ratio of the medians.
    turns = {name: statistics.median(v / b for v, b in zip(t, times["base"])) for name, t in times.items()}
    return [{"model": name, "batch": batch, "length": length, "threads": torch.get_num_threads(),
             "median_s": round(statistics.median(t), 6), "x_base": round(statistics.median(t) / base, 3),
             "x_base_turns": round(turns[name], 3), "all_s": [round(v, 6) for v in t]}
            for name, t in times.items()]  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | forward (median s) | x base | x base (median of turns) |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['median_s']:.3f} | {r['x_base']:.2f} | {r['x_base_turns']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", nargs="+", default=PLANS, help="plans whose conversion is timed next to the base")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5, help="interleaved timed turns (the median is reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer tiny Llama instead of SmolLM2")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.plans, args.batch, args.length, args.reps, tiny=args.tiny)
    print(table(rows))
    if args.out:
        stamp = datetime.date.today().isoformat()
        Path(args.out).write_text(json.dumps({"date": stamp, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
