"""``surgery run``: convert -> recover -> evaluate -> save, with a model card; and the stage commands.

Stage directories under the plan's ``output``: ``convert/`` (the converted model), ``recover/`` (adapter, loss
curve, checkpoints), ``eval/`` (tables, chart); the final model and its ``README.md`` card go to ``output`` itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from surgery.artifacts import load, save, versions
from surgery.convert import convert
from surgery.plan import Plan


def _output(plan: Plan) -> Path:
    return Path(plan.output or "runs/surgery")


def _tokenizer(plan: Plan) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(plan.model)


def generate_sample(model: Any, tokenizer: Any, prompt: str = "The capital of France is", max_new_tokens: int = 24) -> str:
    """Greedy continuation of ``prompt`` through the model's cache (a smoke test of decoding)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _manifest_summary(model: Any) -> str:
    rows = ["| layer | module | mixer | weights | copied | reshaped | new | dropped |", "|---|---|---|---|---|---|---|---|"]
    for r in model.surgery.manifest:
        rows.append(
            f"| {r.layer} | `{r.path}` | {r.mixer} | {r.weights} | {len(r.copied)} | {len(r.reshaped)} | "
            f"{len(r.created)} | {len(r.dropped)} |"
        )
    return "\n".join(rows)


def model_card(plan: Plan, model: Any, report: dict[str, Any]) -> str:
    """The ``README.md`` of a run: plan, manifest summary, loss curve, evaluation table, tokens, times, versions."""
    parts = [
        f"# {Path(plan.output or 'surgery').name}",
        f"Converted from `{plan.model}` by surgery (plan version {plan.version}, dtype {plan.dtype}). "
        "Load it with `surgery.load(dir)`, or `AutoModelForCausalLM.from_pretrained(dir)` after `import surgery`.",
        "## Plan", "```yaml\n" + yaml.safe_dump(plan.to_dict(), sort_keys=False).rstrip() + "\n```",
        "## Mapping manifest", _manifest_summary(model),
    ]  # fmt: skip
    rec = report.get("recover")
    if rec:
        parts += ["## Recovery", f"Tokens: {rec.get('tokens', 'n/a')}, steps: {rec.get('steps', 'n/a')}.",
                  "![loss curve](recover/loss.png)"]  # fmt: skip
    if report.get("eval_table"):
        parts += ["## Evaluation", report["eval_table"], "![evaluation](eval/results.png)"]
    if report.get("sample"):
        parts += ["## Sample", f"`{report['sample_prompt']}` -> `{report['sample']}`"]
    times = "\n".join(f"| {k} | {v:.1f} |" for k, v in report["wall_s"].items())
    parts += ["## Wall times", "| stage | seconds |\n|---|---|\n" + times]
    parts += ["## Versions", "\n".join(f"- {k} {v}" for k, v in versions().items())]
    return "\n\n".join(parts) + "\n"


def run(plan: Plan, *, model: Any = None, limit: float | None = None) -> dict[str, Any]:
    """Run every stage the plan has; returns the report (also written to ``<output>/report.json``)."""
    out = _output(plan)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"wall_s": {}}
    tokenizer = _tokenizer(plan)

    t = time.perf_counter()
    model = convert(plan, model)
    report["wall_s"]["convert"] = time.perf_counter() - t
    print(f"[surgery] converted {len(model.surgery.manifest)} layer(s) in {report['wall_s']['convert']:.1f}s", flush=True)

    if plan.recover is not None:
        from surgery.recovery import recover

        t = time.perf_counter()
        model = recover(model, plan, tokenizer=tokenizer, out_dir=out / "recover")
        report["wall_s"]["recover"] = time.perf_counter() - t
        report["recover"] = getattr(model, "surgery_recover_report", None) or {}

    if plan.eval is not None:
        from surgery.evaluate import evaluate, format_table

        t = time.perf_counter()
        results = evaluate(model, plan, tokenizer=tokenizer, out_dir=out / "eval", limit=limit)
        report["wall_s"]["eval"] = time.perf_counter() - t
        report["eval"] = results
        report["eval_table"] = format_table(results)
        print(report["eval_table"], flush=True)

    report["sample_prompt"] = "The capital of France is"
    report["sample"] = generate_sample(model, tokenizer, report["sample_prompt"])
    print(f"[surgery] sample: {report['sample_prompt']!r} -> {report['sample']!r}", flush=True)

    t = time.perf_counter()
    report["wall_s"]["save"] = 0.0
    card = model_card(plan, model, report)
    save(model, out / "model", tokenizer=tokenizer, extra_files={"README.md": card})
    report["wall_s"]["save"] = time.perf_counter() - t
    (out / "README.md").write_text(model_card(plan, model, report))
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"[surgery] saved to {out / 'model'}; model card {out / 'README.md'}", flush=True)
    return report


def _stage_model(plan: Plan) -> Any:
    """The newest model of a run: recovered, else converted, else converted now."""
    for stage in ("model", "recover/model", "convert"):
        path = _output(plan) / stage
        if (path / "config.json").exists():
            return load(path)
    return convert(plan)


def recover_command(plan_path: str) -> int:
    from surgery.plan import load_plan
    from surgery.recovery import recover

    plan = load_plan(plan_path)
    if plan.recover is None:
        raise ValueError(f"{plan_path} has no recover: section")
    model = _stage_model(plan)
    tokenizer = _tokenizer(plan)
    out = _output(plan) / "recover"
    model = recover(model, plan, tokenizer=tokenizer, out_dir=out)
    if plan.recover.merge:
        # Keep the recovered model itself (LoRA merged), so that a later `surgery eval` evaluates it.
        save(model, out / "model", tokenizer=tokenizer)
        print(f"recovered model saved to {out / 'model'}")
    return 0


def eval_command(plan_path: str, limit: float | None = None) -> int:
    from surgery.evaluate import evaluate, format_table
    from surgery.plan import load_plan

    plan = load_plan(plan_path)
    model = _stage_model(plan)
    results = evaluate(model, plan, tokenizer=_tokenizer(plan), out_dir=_output(plan) / "eval", limit=limit)
    print(format_table(results))
    return 0


__all__ = ["eval_command", "generate_sample", "model_card", "recover_command", "run"]
