"""Recipe search for recovery: which ``recover:`` section brings the main job's model closest to base at a budget.

Each variant is a set of overrides deep-merged into a plan (default ``examples/demo-lora.yaml``); the variant converts
SmolLM2-135M, recovers, and scores token perplexity on the 20 held-out 512-token windows (no lm-eval, so a variant
costs its training plus a few seconds). The winner became the main job's recipe; ``surgery run`` then confirms it
with the full evaluation (next sentence and passkeys included).

    python benchmarks/recipes.py [--variants benchmarks/recipe_variants.json] [--only ctrl,e4] [--out runs/recipes]

``recipe_variants.json`` holds the 49 variants measured on an H200 (``results/recipes-h200.jsonl``, about 20 s
each there; 8 to 10 min each on 2 CPU cores). Not part of CI. Prints one JSON line per variant and appends it to
``<out>/recipes.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recovery import heldout_windows, token_ppl  # noqa: E402
from surgery import demo  # noqa: E402
from surgery.convert import convert  # noqa: E402
from surgery.plan import load_plan  # noqa: E402
from surgery import recover  # noqa: E402  (resolves the recover verb's inputs from a plan)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, recursively for nested dicts (``over`` wins).

    A section with ``stages_replace: true`` replaces ``stages`` instead (a variant that drops a stage).
    """
    out = copy.deepcopy(base)
    over = dict(over)
    if over.pop("stages_replace", False):
        out["stages"] = copy.deepcopy(over.pop("stages"))
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="examples/demo-lora.yaml")
    ap.add_argument("--variants", default=str(Path(__file__).with_name("recipe_variants.json")))
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument("--out", default="runs/recipes")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data = demo.prepare_demo()
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = heldout_windows(data, tok)
    base_raw = yaml.safe_load(Path(args.plan).read_text())
    base_raw["model"] = str(model_dir)
    base_raw["recover"]["data"]["source"] = str(data.train)
    variants = json.loads(Path(args.variants).read_text())
    names = args.only.split(",") if args.only else list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; {args.variants} has {list(variants)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base_ppl = token_ppl(teacher, windows)["ppl"]
    print(json.dumps({"variant": "base", "ppl": round(base_ppl, 3)}), flush=True)
    for name in names:
        raw = merge(base_raw, variants[name])
        raw["output"] = str(out / name)
        t0 = time.perf_counter()
        plan = load_plan(raw)
        result = recover(convert(plan), plan, tokenizer=tok, out_dir=out / name / "recover", resume=False,
                         teacher_model=teacher)  # fmt: skip
        model, report = result.model, result.to_dict()
        ppl = token_ppl(model.eval(), windows)
        row = {"variant": name, "ppl": round(ppl["ppl"], 3), "x": round(ppl["ppl"] / base_ppl, 3),
               "ppl256": round(ppl["ppl_pos256"], 3), "s": round(time.perf_counter() - t0, 1),
               "tokens": report.get("tokens"),
               "stages": {k: {f: v[f] for f in ("steps", "final_loss", "seconds")}
                          for k, v in report.get("stages", {}).items()}}  # fmt: skip
        print(json.dumps(row), flush=True)
        with (out / "recipes.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
