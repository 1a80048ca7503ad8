"""The model card of a run (``README.md``): plan, manifest summary, loss curve, evaluation table, times, versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from surgery.artifacts import versions


def manifest_summary(model: Any) -> str:
    """One Markdown row per converted layer: module, mixer, weight map and tensor counts."""
    rows = ["| layer | module | mixer | weights | copied | reshaped | new | dropped |", "|---|---|---|---|---|---|---|---|"]
    for r in model.surgery.manifest:
        rows.append(
            f"| {r.layer} | `{r.path}` | {r.mixer} | {r.weights} | {len(r.copied)} | {len(r.reshaped)} | "
            f"{len(r.created)} | {len(r.dropped)} |"
        )
    return "\n".join(rows)


def model_card(plan: Any, model: Any, report: Any) -> str:
    """The ``README.md`` of a run, from the plan, the converted model and the run's ``RunReport``."""
    from surgery.evaluate import format_table

    parts = [
        f"# {Path(plan.output or 'surgery').name}",
        f"Converted from `{plan.model}` by surgery (plan version {plan.version}, dtype {plan.dtype}). "
        "Load it with `surgery.load(dir)`, or `AutoModelForCausalLM.from_pretrained(dir)` after `import surgery`.",
        "## Plan", "```yaml\n" + yaml.safe_dump(plan.to_dict(), sort_keys=False).rstrip() + "\n```",
        "## Mapping manifest", manifest_summary(model),
    ]  # fmt: skip
    if report.recover is not None:
        rec = report.recover
        parts += ["## Recovery", f"Tokens: {rec.tokens}, steps: {rec.steps}.", "![loss curve](recover/loss.png)"]
    if report.eval is not None:
        parts += ["## Evaluation", format_table(report.eval), "![evaluation](eval/results.png)"]
    if report.sample:
        parts += ["## Sample", f"`{report.sample_prompt}` -> `{report.sample}`"]
    times = "\n".join(f"| {k} | {v:.1f} |" for k, v in report.wall_s.items())
    parts += ["## Wall times", "| stage | seconds |\n|---|---|\n" + times]
    parts += ["## Versions", "\n".join(f"- {k} {v}" for k, v in versions().items())]
    return "\n\n".join(parts) + "\n"
