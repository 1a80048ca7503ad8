"""Recovery quality benchmark: the main job's plan at 0, 1 and 4 times its recovery token budget.

For each budget multiple m, the plan (default ``examples/demo-lora.yaml``: SmolLM2-135M, every layer Liger-GLA) is run
with every stage's ``tokens`` scaled by m (m = 0: no recovery at all): convert, recover, then
``surgery.evaluate`` on the plan's local tasks next to the base model, plus token perplexity on the 20 held-out
512-token windows (the measure of the quality anchor, research/quality_anchor.md, and of benchmarks/recipes.py).

    python benchmarks/recovery.py [--plan examples/demo-lora.yaml] [--budgets 0,1,4] [--out runs/bench-recovery]
                                  [--extra wiki_nextsent=100]

Not part of CI. Each budget writes ``<out>/<m>x/{recover,eval}/`` and ``<out>/<m>x/row.json``; the recover stage
resumes (a finished one is reloaded, not retrained), so a budget whose ``recover/`` is copied from a ``surgery
run`` of the same plan only re-evaluates. ``--extra TASK=N`` also evaluates TASK on N documents at every budget (a
budget already in ``row.json`` is reloaded and only that task runs). Prints a Markdown table and writes
``results.json`` / ``results.md``. On 2 CPU cores (bf16 autocast) an attention-transfer step takes about 3.6 s and
a LoRA step about 5.2 s: 1x is about 7 min of training, 4x about 28; an evaluation of both models about 3.5 min.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402
from surgery import demo  # noqa: E402
from surgery.convert import convert  # noqa: E402
from surgery import evaluate  # noqa: E402  (resolves the evaluate verb's inputs from a plan)
from surgery.plan import load_plan  # noqa: E402
from surgery import recover  # noqa: E402  (resolves the recover verb's inputs from a plan)


def token_ppl(model: torch.nn.Module, windows: list[torch.Tensor]) -> dict[str, float]:
    """Token perplexity over every position of each window ``[T]``, and over positions >= 256 only."""
    device = next(model.parameters()).device
    nll, n, nll_late, n_late = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for ids in windows:
            ids = ids.to(device)
            logits = model(ids[None]).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
            nll, n = nll + loss.sum().item(), n + loss.numel()
            nll_late, n_late = nll_late + loss[255:].sum().item(), n_late + loss[255:].numel()
    return {"ppl": math.exp(nll / n), "ppl_pos256": math.exp(nll_late / n_late), "tokens": n}


def heldout_windows(data: demo.DataPaths, tokenizer: Any, count: int = 20) -> list[torch.Tensor]:
    """The first ``count`` held-out perplexity documents, as token ids cut to 512."""
    rows = [json.loads(line) for line in data.heldout_ppl.read_text().splitlines()][:count]
    return [torch.tensor(tokenizer(r["text"])["input_ids"][:512]) for r in rows]


def scaled_plan(raw: dict[str, Any], multiple: float, out: Path) -> Any:
    """The plan with its recovery budget times ``multiple`` (no ``recover`` section at 0), output under ``out``."""
    raw = json.loads(json.dumps(raw))
    raw["output"] = str(out)
    rec = raw.get("recover")
    if multiple == 0 or rec is None:
        raw.pop("recover", None)
    else:
        for stage in (rec.get("stages") or {}).values():
            section = stage or {}
            if "tokens" in section:
                section["tokens"] = int(section["tokens"] * multiple)
                section["save_steps"] = max(1, int(section.get("save_steps", 100) * multiple))
    return load_plan(raw)


def recovered(raw: dict[str, Any], multiple: float, base: torch.nn.Module, tokenizer: Any,
              out: Path) -> tuple[Any, torch.nn.Module, dict[str, Any]]:  # fmt: skip
    """(plan, model, recover report) of one budget: converted, then recovered (a finished run is only reloaded)."""
    plan = scaled_plan(raw, multiple, out)
    model, report = convert(plan), {}
    if plan.recover is not None:
        result = recover(model, plan, tokenizer=tokenizer, out_dir=out / "recover", teacher_model=base)
        model, report = result.model, result.to_dict()
    if torch.cuda.is_available():
        model = model.cuda()
    return plan, model.eval(), report


def run_budget(raw: dict[str, Any], multiple: float, base: torch.nn.Module, tokenizer: Any,
               windows: list[torch.Tensor], out: Path) -> dict[str, Any]:  # fmt: skip
    t0 = time.perf_counter()
    plan, model, report = recovered(raw, multiple, base, tokenizer, out)
    row: dict[str, Any] = {"multiple": multiple, "tokens": report.get("tokens", 0), "steps": report.get("steps", 0)}
    if report:
        row.update(train_s=round(time.perf_counter() - t0, 1), stages=report.get("stages"))
    row["token_ppl"] = token_ppl(model, windows)
    results = evaluate(model, plan, base_model=base, tokenizer=tokenizer, out_dir=out / "eval")
    row["tasks"] = {name: {k: r[k] for k in ("metric", "base", "converted", "ratio", "samples")}
                    for name, r in results["tasks"].items()}  # fmt: skip
    row["eval_s"] = results["settings"]["seconds"]
    return row


def extra_eval(raw: dict[str, Any], multiple: float, base: torch.nn.Module, tokenizer: Any, out: Path, task: str,
               limit: int) -> dict[str, Any]:  # fmt: skip
    """One more task at another limit for a budget whose recovery is done (``recover`` reloads it, no training)."""
    plan, model, _ = recovered(raw, multiple, base, tokenizer, out)
    r = evaluate(model, plan, base_model=base, tokenizer=tokenizer, tasks=[task], limit=limit)["tasks"][task]
    return {k: r[k] for k in ("metric", "base", "converted", "ratio", "samples")}


def table(rows: list[dict[str, Any]], base_ppl: float) -> str:
    names = list(rows[0]["tasks"]) if rows else []
    head = ["budget", "tokens", "steps", "token ppl", "÷ base"] + [
        f"{n} {rows[0]['tasks'][n]['metric']} ÷ base" for n in names
    ]
    extras = list(rows[0].get("extra", {})) if rows else []
    head += [f"{e} {rows[0]['extra'][e]['metric']} ÷ base" for e in extras]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratios = [r["tasks"][n]["ratio"] for n in names] + [r.get("extra", {}).get(e, {}).get("ratio") for e in extras]
        ppl = r["token_ppl"]["ppl"]
        cells = [f"{r['multiple']:g}x", str(r["tokens"]), str(r["steps"]), f"{ppl:.4g}", f"{ppl / base_ppl:.3f}"]
        cells += [f"{x:.3g}" if x is not None else "–" for x in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", default="examples/demo-lora.yaml", help="the plan whose recovery budget is scaled")
    ap.add_argument("--budgets", default="0,1,4", help="multiples of the plan's token budget, comma-separated")
    ap.add_argument("--out", default="runs/bench-recovery", help="output directory")
    ap.add_argument("--extra", action="append", default=[], metavar="TASK=N",
                    help="also evaluate TASK on N documents (e.g. wiki_nextsent=100); repeatable")
    args = ap.parse_args()
    extras = [(t, int(n)) for t, n in (e.split("=") for e in args.extra)]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = yaml.safe_load(Path(args.plan).read_text())
    model_dir, data = demo.prepare_demo()
    raw["model"] = str(model_dir)  # the plan's paths are relative to the repository root, where this runs
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if torch.cuda.is_available():
        base = base.cuda()
    windows = heldout_windows(data, tokenizer)
    base_ppl = token_ppl(base, windows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for multiple in (float(m) for m in args.budgets.split(",")):
        label = f"{multiple:g}x"
        saved = out / label / "row.json"
        if saved.exists():
            print(f"[recovery] budget {label}: reusing {saved}", flush=True)
            row = json.loads(saved.read_text())
        else:
            print(f"[recovery] budget {label}", flush=True)
            row = run_budget(raw, multiple, base, tokenizer, windows, out / label)
            saved.write_text(json.dumps(row, indent=1, default=str))
            print(json.dumps({k: row[k] for k in ("multiple", "tokens", "token_ppl")}), flush=True)
        for task, limit in extras:
            key = f"{task}={limit}"
            if key not in row.setdefault("extra", {}):
                print(f"[recovery] budget {label}: {key}", flush=True)
                row["extra"][key] = extra_eval(raw, multiple, base, tokenizer, out / label, task, limit)
                saved.write_text(json.dumps(row, indent=1, default=str))
        rows.append(row)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__,
        "surgery": getattr(surgery, "__version__", "?"),
        "plan": args.plan,
        "base_token_ppl": base_ppl,
    }
    (out / "results.json").write_text(json.dumps(meta | {"rows": rows}, indent=1, default=str))
    md = table(rows, base_ppl["ppl"])
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
