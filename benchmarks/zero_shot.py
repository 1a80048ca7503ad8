"""Held-out Wikipedia perplexity of SmolLM2-135M, base vs each example plan, with no training.

    python benchmarks/zero_shot.py [--windows 20] [examples/liger-gla.yaml ...]

Scores the demo's held-out 512-token windows (articles never used for training) over every token and over
positions >= 256 only (beyond Liger's 65-key window). Not part of CI; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recovery import heldout_windows, token_ppl  # noqa: E402
from surgery import demo  # noqa: E402
from surgery.convert import convert  # noqa: E402
from surgery.plan import load_plan  # noqa: E402

PLANS = ["liger-gla", "liger-gsa", "liger-hgrn2", "gla-only", "swa-only", "liger-gla-hybrid"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plans", nargs="*", default=[f"examples/{p}.yaml" for p in PLANS])
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data = demo.prepare_demo()
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = heldout_windows(data, tok, args.windows)
    print("| model | ppl wiki | x base | ppl pos>=256 | x base |\n|---|---|---|---|---|")
    base = token_ppl(AutoModelForCausalLM.from_pretrained(model_dir).eval(), windows)
    print(f"| base | {base['ppl']:.2f} | 1.00 | {base['ppl_pos256']:.2f} | 1.00 |", flush=True)
    for path in args.plans:
        t0 = time.perf_counter()
        r = token_ppl(convert(load_plan(path)).eval(), windows)
        print(f"| {Path(path).stem} | {r['ppl']:.4g} | {r['ppl'] / base['ppl']:.3g} | {r['ppl_pos256']:.4g} | "
              f"{r['ppl_pos256'] / base['ppl_pos256']:.3g} |", flush=True)
        print(f"<!-- {Path(path).stem}: {time.perf_counter() - t0:.0f}s -->", file=sys.stderr)


if __name__ == "__main__":
    main()
