"""Evaluation stage: lm-eval on the base and the converted model, same tasks, same settings, side by side.

Both models run in memory through lm-eval's ``HFLM`` wrapper. The result of every task is summarized by one main
metric (``LocalTask.metric`` for the shipped tasks, ``MAIN_METRICS`` or the first of ``_FALLBACK`` otherwise) as
base / converted / converted÷base, and written as ``results.json``, ``results.md`` and ``results.png``.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, TypedDict

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator
from torch import nn

from surgery.mixer import Options

# Main metric of common lm-eval tasks: the one papers quote (acc_norm where length bias matters).
MAIN_METRICS: dict[str, str] = {
    "piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
    "winogrande": "acc", "mmlu": "acc", "lambada_openai": "acc", "boolq": "acc", "openbookqa": "acc_norm",
    "sciq": "acc_norm", "wikitext": "word_perplexity",
}
_FALLBACK = ("acc_norm", "acc", "exact_match", "word_perplexity", "perplexity")
_LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"}


class TaskResult(TypedDict):
    """One task, base and converted side by side on its main metric (``ratio`` = converted / base)."""

    metric: str
    higher_is_better: bool
    base: float | None
    converted: float | None
    ratio: float | None
    base_stderr: float | None
    converted_stderr: float | None
    samples: int | None
    limit: float | None
    num_fewshot: int
    base_metrics: dict[str, float]
    converted_metrics: dict[str, float]


class EvalResult(TypedDict):
    """What ``evaluate`` returns (and writes as ``results.json``): per task, and the settings both models ran with."""

    tasks: dict[str, TaskResult]
    settings: dict[str, Any]


class EvalSpec(Options):
    """The plan's ``eval:`` section: which lm-eval tasks run, on how many documents, with which settings.

    Base and converted models always run with the same settings. Task names are lm-eval's (``piqa``,
    ``arc_easy``, ``mmlu``...; their data must be reachable) or those defined by task YAMLs in the ``include``
    directories (the offline demo's ``wiki_ppl``, ``wiki_nextsent``, ``passkey_*`` come from there).
    """

    tasks: tuple[str, ...] = Field(description="task names, in report order")
    include: tuple[Path, ...] = Field((), description="directories of lm-eval task YAMLs (local tasks)")
    limit: float | None = Field(None, gt=0, description="documents per task (>= 1) or a fraction (< 1), every task")
    limits: dict[str, float | None] = Field(
        default_factory=dict, description="documents per task name; a task not named (or null) runs in full"
    )
    num_fewshot: dict[str, NonNegativeInt] = Field(default_factory=lambda: {"mmlu": 5}, description="shots per task")
    batch_size: PositiveInt = Field(4, description="lm-eval batch size")
    max_length: int = Field(2560, ge=64, description="longest input in tokens")

    @field_validator("tasks")
    @classmethod
    def _tasks_named(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        if not tasks:
            raise ValueError("eval.tasks is empty: name at least one task (e.g. piqa)")
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if dup:
            raise ValueError(f"eval.tasks names {dup} more than once")
        return tasks

    @field_validator("limits")
    @classmethod
    def _positive(cls, limits: dict[str, float | None]) -> dict[str, float | None]:
        bad = sorted(k for k, v in limits.items() if v is not None and v <= 0)
        if bad:
            raise ValueError(f"eval.limits must be > 0 (or null for the whole task): {bad}")
        return limits


def _spec(spec: EvalSpec | None, tasks: list[str] | None, limit: int | float | None) -> EvalSpec:
    if not isinstance(spec, EvalSpec):
        if tasks is None:
            raise ValueError("evaluate: name the tasks (tasks=[...]) or pass an eval spec (a plan's eval: section)")
        spec = EvalSpec(tasks=tuple(tasks))
    update: dict[str, Any] = {}
    if tasks is not None:
        update["tasks"] = tuple(tasks)
    if limit is not None:
        update["limit"] = limit
    # Re-validate rather than model_copy(update=...), which would skip the checks on the explicit arguments.
    return EvalSpec(**{**spec.model_dump(), **update}) if update else spec


def _task_manager(spec: EvalSpec) -> Any:
    from lm_eval.tasks import TaskManager

    missing = [str(d) for d in spec.include if not Path(d).is_dir()]
    if missing:
        raise ValueError(f"eval.include: no such directory: {', '.join(missing)}")
    local = {p.stem for d in spec.include for p in Path(d).glob("*.yaml")}
    # Indexing lm-eval's own ~15K task configs takes ~10 s: skip it when every task is a local one.
    manager = TaskManager(include_path=[str(d) for d in spec.include] or None,
                          include_defaults=not set(spec.tasks) <= local)  # fmt: skip
    known = set(manager.all_tasks)
    for name in spec.tasks:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(f"eval.tasks: lm-eval knows no task {name!r}{hint}")
    return manager


def _groups(spec: EvalSpec) -> list[tuple[int | float | None, int | None, list[str]]]:
    """Tasks sharing (limit, shots) go through one simple_evaluate call; order follows ``spec.tasks``."""
    groups: dict[tuple[int | float | None, int | None], list[str]] = {}
    for name in spec.tasks:
        lim = spec.limit if spec.limit is not None else spec.limits.get(name)
        if lim is not None and lim >= 1:
            lim = int(lim)  # lm-eval reads a float below 1 as a fraction, anything else as a count
        groups.setdefault((lim, spec.num_fewshot.get(name)), []).append(name)
    return [(lim, shots, names) for (lim, shots), names in groups.items()]


def _run(model: nn.Module, tokenizer: Any, spec: EvalSpec, manager: Any) -> tuple[dict[str, Any], float]:
    """lm-eval on one model: ``{task: {"metrics": {name: value}, "higher_is_better": {...}, "samples": n}}``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)  # its warnings about in-memory models and default aggregations are noise here
    t0 = time.perf_counter()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size, max_length=spec.max_length)
        out: dict[str, Any] = {}
        for lim, shots, names in _groups(spec):
            try:
                res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=shots,
                                              limit=lim, bootstrap_iters=0, log_samples=False)
            except Exception as err:  # name the tasks: lm-eval's own message rarely does (hub datasets offline...)
                raise RuntimeError(f"lm-eval failed on task(s) {', '.join(names)}: {err}") from err
            for name in names:
                raw = res["results"][name]
                metrics = {_metric_key(k): float(v) for k, v in raw.items()
                           if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
                out[name] = {"metrics": metrics, "higher_is_better": res.get("higher_is_better", {}).get(name, {}),
                             "samples": _samples(res, name), "limit": lim, "num_fewshot": shots or 0}
    finally:
        model.train(was_training)
        log.setLevel(level)
    return out, time.perf_counter() - t0


def _samples(res: dict[str, Any], name: str) -> int | None:
    """Documents scored for a task; for a group (mmlu), the sum over its subtasks."""
    counts, groups = res.get("n-samples", {}), res.get("group_subtasks", {})
    if name in counts:
        return int(counts[name]["effective"])
    subs = [_samples(res, sub) for sub in groups.get(name, [])]
    return sum(n for n in subs if n is not None) if subs else None


def _metric_key(key: str) -> str:
    """lm-eval's ``"acc,none"`` -> ``"acc"``; a filtered ``"exact_match,strict-match"`` keeps its filter."""
    name, _, filt = key.partition(",")
    return name if filt == "none" else key


def _main_metric(name: str, metrics: dict[str, float]) -> str:
    if name in MAIN_METRICS and MAIN_METRICS[name] in metrics:
        return MAIN_METRICS[name]
    for m in _FALLBACK:
        hits = [k for k in metrics if k == m or k.startswith(m + ",")]
        if hits:
            return hits[0]
    if not metrics:
        raise ValueError(f"lm-eval returned no metric for task {name!r}")
    return sorted(metrics)[0]


def _binomial_stderr(p: float | None, n: int | None) -> float | None:
    # acc-like metrics are means of 0/1 scores; lm-eval's own stderr needs bootstrap_iters > 0, which we skip.
    if p is None or not n or not 0.0 <= p <= 1.0:
        return None
    return math.sqrt(p * (1.0 - p) / n)


def evaluate(model: nn.Module, spec: EvalSpec | None, base: nn.Module, tokenizer: Any, out: str | Path | None = None,
             *, tasks: list[str] | None = None, limit: int | float | None = None) -> EvalResult:
    """Run lm-eval on the converted ``model`` and on the ``base`` model, with the same tasks and settings.

    Takes what it needs, resolved: a plan's ``eval`` section, the base model and tokenizer (``surgery.evaluate``
    and ``surgery.pipeline.Run`` load them from a plan, once). Writes only to ``out``.

    Args:
        model: the converted model (in memory; a peft-wrapped model works too).
        spec: the ``eval:`` section (``EvalSpec``), or None to evaluate ``tasks`` with the defaults.
        base: the unconverted model. It runs on ``model``'s device and goes back to its own afterwards (the base
            is shared: the run's teacher and source, never changed by a consumer).
        tokenizer: shared by both models.
        out: where ``results.json``, ``results.md`` and ``results.png`` go; None writes nothing.
        tasks: overrides ``spec.tasks``.
        limit: documents per task, overrides ``spec.limit``/``limits``.

    Returns:
        ``{"tasks": {name: {"metric", "higher_is_better", "base", "converted", "ratio", "samples", ...}},
        "settings": {...}}``; ``ratio`` is converted÷base (None when base is 0).
    """
    spec = _spec(spec, tasks, limit)
    if tokenizer is None:
        raise ValueError("evaluate: pass the tokenizer both models share")
    device = next(model.parameters()).device
    home = next(base.parameters()).device
    try:
        base.to(device)  # same device as the converted model, same settings (moved, never reloaded)
        return _evaluate(model, spec, base, tokenizer, out)
    finally:
        base.to(home)


def _evaluate(model: nn.Module, spec: EvalSpec, base_model: nn.Module, tokenizer: Any, out: str | Path | None
              ) -> EvalResult:  # fmt: skip
    manager = _task_manager(spec)
    base, base_s = _run(base_model, tokenizer, spec, manager)
    conv, conv_s = _run(model, tokenizer, spec, manager)
    table: dict[str, Any] = {}
    for name in spec.tasks:
        metric = _main_metric(name, base[name]["metrics"])
        b, c = base[name]["metrics"].get(metric), conv[name]["metrics"].get(metric)
        hib = base[name]["higher_is_better"].get(metric, metric not in _LOWER_IS_BETTER)
        n = base[name]["samples"]
        table[name] = {
            "metric": metric, "higher_is_better": bool(hib), "base": b, "converted": c,
            "ratio": (c / b) if (b is not None and c is not None and b != 0) else None,
            "base_stderr": _binomial_stderr(b, n) if metric.startswith("acc") else None,
            "converted_stderr": _binomial_stderr(c, n) if metric.startswith("acc") else None,
            "samples": n, "limit": base[name]["limit"], "num_fewshot": base[name]["num_fewshot"],
            "base_metrics": base[name]["metrics"], "converted_metrics": conv[name]["metrics"],
        }
    from importlib.metadata import version

    results: EvalResult = {"tasks": table, "settings": {"batch_size": spec.batch_size, "max_length": spec.max_length,
                                            "lm_eval": version("lm_eval"),
                                            "seconds": {"base": round(base_s, 1), "converted": round(conv_s, 1)}}}
    if out is not None:
        write_results(results, Path(out))
    return results


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 10 else f"{x:.3f}"


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: task, metric (↑ higher is better, ↓ lower), base, converted, converted÷base, n."""
    lines = ["| task | metric | base | converted | converted ÷ base | n |", "|---|---|---:|---:|---:|---:|"]
    for name, r in results["tasks"].items():
        arrow = "↑" if r["higher_is_better"] else "↓"
        shots = f" ({r['num_fewshot']}-shot)" if r.get("num_fewshot") else ""
        cells = [f"{_fmt(r[k])} ± {_fmt(r[k + '_stderr'])}" if r.get(k + "_stderr") is not None else _fmt(r[k])
                 for k in ("base", "converted")]
        lines.append(f"| {name}{shots} | {r['metric']} {arrow} | {cells[0]} | {cells[1]} | {_fmt(r['ratio'])} "
                     f"| {r['samples'] if r['samples'] is not None else '–'} |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Bars of converted÷base per task, 1 = parity, green = no worse than base.

    Lower-is-better metrics (perplexities, whose ratios reach 1e5 for an untrained conversion) get a log axis;
    scores such as accuracy a linear one, so a ratio of 0 (the passkey lost) still shows.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    panels = [[(n, r) for n, r in results["tasks"].items() if not r["higher_is_better"]],
              [(n, r) for n, r in results["tasks"].items() if r["higher_is_better"]]]
    panels = [p for p in panels if p]
    fig, axes = plt.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": [len(p) for p in panels]},
                             figsize=(max(4.0, 1.5 * len(results["tasks"]) + 1.5), 3.8))
    for ax, rows in zip(axes[0], panels):
        lower = not rows[0][1]["higher_is_better"]
        labels = [f"{n}\n{r['metric']}" for n, r in rows]
        ratios = [r["ratio"] for _, r in rows]
        shown = [v if v is not None else 0.0 for v in ratios]
        colors = ["#999999" if v is None else "#3a8f5c" if (v <= 1 if lower else v >= 1) else "#c8553d"
                  for v in ratios]
        if lower:
            ax.set_yscale("log")
            shown = [v if v > 0 else 1.0 for v in shown]  # no ratio: a flat grey stub at parity
        else:
            ax.set_ylim(0, max([1.2] + [1.15 * v for v in shown]))
        bars = ax.bar(labels, shown, color=colors)
        for bar, v in zip(bars, ratios):
            ax.annotate("n/a" if v is None else _fmt(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_title("lower is better" if lower else "higher is better", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    axes[0][0].set_ylabel("converted ÷ base")
    fig.suptitle("converted vs base (green: no worse than base)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out_dir`` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=1))
    st = results.get("settings", {})
    note = (f"\nlm-eval {st.get('lm_eval', '?')}, batch size {st.get('batch_size', '?')}, max length "
            f"{st.get('max_length', '?')}; wall time base {st.get('seconds', {}).get('base', '?')} s, converted "
            f"{st.get('seconds', {}).get('converted', '?')} s. Same tasks, documents and settings for both.\n")
    paths["md"].write_text(format_table(results) + note)
    plot_results(results, paths["png"])
    return paths
