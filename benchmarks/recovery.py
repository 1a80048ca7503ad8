"""Recovery quality benchmark: SmolLM2-135M converted to Liger-GLA, converted÷base against recovery tokens.

For each budget multiple m (default 0, 1 and 4) the base model is converted afresh with every attention layer
replaced by ``liger_attention`` (0.5 SWA-64 + 0.5 GLA, Liger's defaults), recovered with the default recipe
(``RecoverSpec()``: LoRA r=8 on q/k/v, lr 1e-3, 512-token chunks, batch 2) on ``m x`` the default budget of tokens,
then evaluated with ``surgery.evaluate`` on the local tasks (held-out Wikipedia perplexity, next sentence,
passkeys) next to the base model. The default budget is what ``RecoverSpec()`` trains when no budget is set: one
epoch over the demo's training articles (379k tokens with SmolLM2's tokenizer, 370 steps).

    python benchmarks/recovery.py [--budgets 0,1,4] [--out runs/bench-recovery] [--limit N] [--tokens T]

Not part of CI. On 2 CPU cores one LoRA step takes 5 to 15 s (the anchor's 5.4 s; 14-18 s measured on a busy
machine), so 1x is 30-90 min and the default 0, 1, 4 sweep several hours; each evaluation takes minutes per
model. On one GPU the whole benchmark should take minutes (not measured). The quality anchor to compare with is
in research/quality_anchor.md (liger + LoRA after 172k tokens: wiki ppl 1.47x base). Prints a Markdown table
and writes ``results.json`` / ``results.md`` into ``--out``; every run keeps its own recover/ and eval/ folders.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402
from surgery import demo  # noqa: E402
from surgery.convert import convert  # noqa: E402
from surgery.evaluate import evaluate  # noqa: E402
from surgery.plan import load_plan  # noqa: E402
from surgery.recipes import RecoverSpec  # noqa: E402
from surgery.recovery import recover  # noqa: E402
from surgery.recover_data import load_chunks  # noqa: E402


def default_budget_tokens(train_file: Path, tokenizer: Any) -> int:
    """Tokens ``RecoverSpec()`` trains on ``train_file`` with no budget set: one epoch of packed chunks."""
    data = RecoverSpec.Data(source=str(train_file))
    return len(load_chunks(data, tokenizer)) * data.seq_len


def plan_for(model_dir: Path, data: demo.DataPaths, out: Path, tokens: int, limit: int | None) -> Any:
    """The plan of one budget: every layer to liger_attention, default recipe with ``tokens``, the local tasks."""
    raw: dict[str, Any] = {
        "version": 1,
        "model": str(model_dir),
        "output": str(out),
        "convert": [{"layers": "all", "mixer": "liger_attention"}],
        "eval": {"data_dir": str(data.root), **({"limit": limit} if limit else {})},
    }
    if tokens > 0:
        raw["recover"] = {"data": {"source": str(data.train)}, "train": {"tokens": tokens}}
    return load_plan(raw)


def run_budget(multiple: float, tokens: int, base: torch.nn.Module, tokenizer: Any, model_dir: Path,
               data: demo.DataPaths, out: Path, limit: int | None) -> dict[str, Any]:
    """Convert, recover on ``tokens`` tokens (none when 0), evaluate next to ``base``."""
    plan = plan_for(model_dir, data, out, tokens, limit)
    model = convert(plan)
    row: dict[str, Any] = {"multiple": multiple, "tokens": tokens}
    if tokens > 0:
        t0 = time.perf_counter()
        model = recover(model, plan, tokenizer=tokenizer, out_dir=out / "recover")
        lora = getattr(model, "surgery_recover_report", {}).get("stages", {}).get("lora", {})
        steps = lora.get("steps") or 0
        row.update(steps=steps, train_s=round(time.perf_counter() - t0, 1), final_loss=lora.get("final_loss"),
                   s_per_step=round(lora["seconds"] / steps, 2) if steps else None)  # fmt: skip
    if torch.cuda.is_available():
        model = model.cuda()
    results = evaluate(model, plan, base_model=base, tokenizer=tokenizer, out_dir=out / "eval")
    row["tasks"] = {name: {k: r[k] for k in ("metric", "base", "converted", "ratio", "samples")}
                    for name, r in results["tasks"].items()}  # fmt: skip
    row["eval_s"] = results["settings"]["seconds"]
    del model
    return row


def table(rows: list[dict[str, Any]]) -> str:
    names = list(rows[0]["tasks"]) if rows else []
    head = "| budget | tokens | steps | s/step | final loss | " + " | ".join(
        f"{n} {rows[0]['tasks'][n]['metric']} ÷ base" for n in names
    ) + " |"  # fmt: skip
    lines = [head, "|" + "---|" * (5 + len(names))]
    for r in rows:
        ratios = [r["tasks"][n]["ratio"] for n in names]
        cells = [f"{x:.3g}" if x is not None else "–" for x in ratios]
        loss = f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "–"
        lines.append(f"| {r['multiple']:g}x | {r['tokens']} | {r.get('steps', 0)} | {r.get('s_per_step') or '–'} | "
                     f"{loss} | " + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="0,1,4", help="multiples of the default token budget, comma-separated")
    ap.add_argument("--tokens", type=int, default=None, help="the 1x budget (default: one epoch of the data)")
    ap.add_argument("--out", default="runs/bench-recovery", help="output directory")
    ap.add_argument("--root", default=None, help="demo root (default: surgery.demo.default_root())")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: EvalSpec's limits)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data = demo.prepare_demo(Path(args.root) if args.root else None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if torch.cuda.is_available():
        base = base.cuda()
    unit = args.tokens or default_budget_tokens(data.train, tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for multiple in (float(m) for m in args.budgets.split(",")):
        label = f"{multiple:g}x"
        print(f"[recovery] budget {label}: {int(multiple * unit)} tokens", flush=True)
        rows.append(run_budget(multiple, int(multiple * unit), base, tokenizer, model_dir, data, out / label,
                               args.limit))  # fmt: skip
        (out / "results.json").write_text(json.dumps(_meta(unit) | {"rows": rows}, indent=1))
    md = table(rows)
    (out / "results.md").write_text(md)
    print(md)
    return 0


def _meta(unit: int) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__,
        "surgery": getattr(surgery, "__version__", "?"),
        "unit_tokens": unit,
        "recipe": RecoverSpec().model_dump(mode="json"),
    }


if __name__ == "__main__":
    raise SystemExit(main())
