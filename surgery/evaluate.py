"""Evaluation stage: lm-eval on the base and the converted model, same tasks, same settings, side by side.

Both models run in memory through lm-eval's ``HFLM`` wrapper. The result of every task is summarized by one main
metric (``eval.metrics`` of the plan, else ``MAIN_METRICS`` or the first of ``_FALLBACK``) as base / converted /
converted÷base, and written as ``results.json``, ``results.md`` and ``results.png``. A task may report more metrics
(``eval.metrics: {wiki_long: [token_perplexity, token_perplexity_late]}``): each further one is a row of its own,
keyed ``task/metric``. When the run recovers, the converted model is also scored before recovery (``before``), so
the table shows base, converted and recovered side by side.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, TypedDict

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator
from torch import nn

from surgery.mixer import Options

# Main metric of common lm-eval tasks: the one papers quote (acc_norm where length bias matters).
MAIN_METRICS: dict[str, str] = {
    "piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "hellaswag": "acc_norm",
    "winogrande": "acc", "mmlu": "acc", "lambada_openai": "acc", "boolq": "acc", "openbookqa": "acc_norm",
    "sciq": "acc_norm", "wikitext": "word_perplexity",
}
_FALLBACK = ("acc_norm", "acc", "exact_match", "word_perplexity", "token_perplexity", "perplexity")
_LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity", "token_perplexity"}
#: A ratio within this of 1 is drawn and read as parity (a lower-is-better 1.000 is not "worse").
PARITY = 0.005


class TaskResult(TypedDict, total=False):
    """One task (or one further metric of it), base and converted side by side (``ratio`` = converted / base).

    ``before``, ``before_ratio`` and ``before_stderr`` are the converted model before recovery (runs that recover).
    """

    task: str
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
    before: float | None
    before_ratio: float | None
    before_stderr: float | None
    note: str | None


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
    metrics: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="metrics reported per task name, the main one first (default: the main "
                                          "metric alone); each further one is a row 'task/metric'")
    notes: dict[str, str] = Field(
        default_factory=dict, description="a note per task (or 'task/metric') printed under the table, e.g. why a "
                                          "figure cannot tell the conversion from the base")
    before_recovery: bool = Field(
        True, description="in a run that recovers, also score the converted model before recovery (one more pass)")
    batch_size: PositiveInt = Field(4, description="lm-eval batch size")
    max_length: int = Field(2560, ge=64, le=1 << 20, description="longest input in tokens")
    trust_code: bool = Field(
        False, description="run Python code that task YAMLs under include name (!function); local task files are "
                           "code (surgery's own demo helpers need no trust)")

    @model_validator(mode="after")
    def _names_and_code(self) -> EvalSpec:
        from surgery.options import did_you_mean
        from surgery.task_code import task_code, untrusted_message

        for key, names in (("limits", self.limits), ("metrics", self.metrics)):
            stray = [n for n in names if n not in self.tasks]
            if stray:
                raise ValueError(f"eval.{key} names {stray[0]!r}, which is not in eval.tasks"
                                 f"{did_you_mean(stray[0], self.tasks)}")  # fmt: skip
        if not self.trust_code:
            code = task_code(self.include)
            if code:
                raise ValueError(f"eval.include: {untrusted_message(code)}")
        return self

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

    from surgery.errors import PlanError
    from surgery.task_code import task_code, untrusted_message

    missing = [str(d) for d in spec.include if not Path(d).is_dir()]
    if missing:
        raise PlanError([("eval.include", f"no such directory: {', '.join(missing)}")])
    code = [] if spec.trust_code else task_code(spec.include)
    if code:  # checked again here: the files may have changed since the plan was validated
        raise PlanError([("eval.include", untrusted_message(code))])
    local = {p.stem for d in spec.include for p in Path(d).glob("*.yaml")}
    # Indexing lm-eval's own ~15K task configs takes ~10 s: skip it when every task is a local one.
    manager = TaskManager(include_path=[str(d) for d in spec.include] or None,
                          include_defaults=not set(spec.tasks) <= local)  # fmt: skip
    known = set(manager.all_tasks)
    for name in spec.tasks:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise PlanError([("eval.tasks", f"lm-eval knows no task {name!r}{hint}")])
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
             *, tasks: list[str] | None = None, limit: int | float | None = None,
             before: nn.Module | Scores | None = None) -> EvalResult:
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
        before: the converted model before recovery, or its ``score`` (taken before training changed it): a third
            column.

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
        return _evaluate(model, spec, base, tokenizer, out, before)
    finally:
        base.to(home)


def _evaluate(model: nn.Module, spec: EvalSpec, base_model: nn.Module, tokenizer: Any, out: str | Path | None,
              before: nn.Module | Scores | None) -> EvalResult:  # fmt: skip
    manager = _task_manager(spec)
    if isinstance(before, nn.Module):
        before = score(before, tokenizer, spec, manager)
    base, base_s = _run(base_model, tokenizer, spec, manager)
    conv, conv_s = _run(model, tokenizer, spec, manager)
    pre = before.results if before is not None else None
    table: dict[str, Any] = {}
    for name in spec.tasks:
        metrics = spec.metrics.get(name) or (_main_metric(name, base[name]["metrics"]),)
        for i, metric in enumerate(metrics):
            if metric not in base[name]["metrics"]:
                raise ValueError(f"eval.metrics.{name}: lm-eval reported no metric {metric!r} for {name} (it has "
                                 f"{', '.join(sorted(base[name]['metrics']))})")
            key = name if i == 0 else f"{name}/{metric}"
            table[key] = _row(name, metric, base[name], conv[name], pre[name] if pre is not None else None)
            if spec.notes.get(key):
                table[key]["note"] = spec.notes[key]
    from importlib.metadata import version

    seconds = {"base": round(base_s, 1), "converted": round(conv_s, 1)}
    if before is not None:
        seconds["before"] = round(before.seconds, 1)
    results: EvalResult = {"tasks": table, "settings": {"batch_size": spec.batch_size, "max_length": spec.max_length,
                                            "lm_eval": version("lm_eval"), "seconds": seconds}}
    if out is not None:
        write_results(results, Path(out))
    return results


class Scores:
    """One model's lm-eval results under a spec (``score``): kept to compare with later models of the same run."""

    def __init__(self, results: dict[str, Any], seconds: float) -> None:
        self.results = results
        self.seconds = seconds


def score(model: nn.Module, tokenizer: Any, spec: EvalSpec, manager: Any = None) -> Scores:
    """lm-eval on one model with ``spec``'s tasks and settings (e.g. the converted model before recovery)."""
    results, seconds = _run(model, tokenizer, spec, manager if manager is not None else _task_manager(spec))
    return Scores(results, seconds)


def _ratio(c: float | None, b: float | None) -> float | None:
    return (c / b) if (b is not None and c is not None and b != 0) else None


def _row(name: str, metric: str, base: dict[str, Any], conv: dict[str, Any], pre: dict[str, Any] | None) -> TaskResult:
    """The table row of ``metric`` of task ``name`` from each model's ``_run`` entry (``pre``: before recovery)."""
    b, c = base["metrics"].get(metric), conv["metrics"].get(metric)
    hib = base["higher_is_better"].get(metric, metric not in _LOWER_IS_BETTER)
    n = base["samples"]
    acc = metric.startswith("acc")
    row: TaskResult = {
        "task": name, "metric": metric, "higher_is_better": bool(hib), "base": b, "converted": c,
        "ratio": _ratio(c, b),
        "base_stderr": _binomial_stderr(b, n) if acc else None,
        "converted_stderr": _binomial_stderr(c, n) if acc else None,
        "samples": n, "limit": base["limit"], "num_fewshot": base["num_fewshot"],
        "base_metrics": base["metrics"], "converted_metrics": conv["metrics"],
    }
    if pre is not None:
        p = pre["metrics"].get(metric)
        row.update(before=p, before_ratio=_ratio(p, b), before_stderr=_binomial_stderr(p, n) if acc else None)
    return row


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 10 else f"{x:.3f}"


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: task, metric (↑ higher is better, ↓ lower), base, converted, converted÷base, n.

    With a ``before`` column (a run that recovered): base, converted before recovery and its ratio, recovered and
    its ratio. Notes follow the table, numbered.
    """
    rows = results["tasks"]
    two = any("before" in r for r in rows.values())
    if two:
        lines = ["| task | metric | base | converted (no recovery) | ÷ base | recovered | ÷ base | n |",
                 "|---|---|---:|---:|---:|---:|---:|---:|"]
    else:
        lines = ["| task | metric | base | converted | converted ÷ base | n |", "|---|---|---:|---:|---:|---:|"]
    notes: list[str] = []
    for key, r in rows.items():
        arrow = "↑" if r["higher_is_better"] else "↓"
        shots = f" ({r['num_fewshot']}-shot)" if r.get("num_fewshot") else ""
        label = r.get("task", key)
        if r.get("note"):
            notes.append(r["note"])
            label += f" [{len(notes)}]"
        cols = ("base", "before", "converted") if two else ("base", "converted")
        cells = [f"{_fmt(r.get(k))} ± {_fmt(r[k + '_stderr'])}" if r.get(k + "_stderr") is not None
                 else _fmt(r.get(k)) for k in cols]  # fmt: skip
        n = r["samples"] if r["samples"] is not None else "–"
        if two:
            lines.append(f"| {label}{shots} | {r['metric']} {arrow} | {cells[0]} | {cells[1]} | "
                         f"{_fmt(r.get('before_ratio'))} | {cells[2]} | {_fmt(r['ratio'])} | {n} |")
        else:
            lines.append(f"| {label}{shots} | {r['metric']} {arrow} | {cells[0]} | {cells[1]} | {_fmt(r['ratio'])} "
                         f"| {n} |")
    lines += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)] if notes else []
    return "\n".join(lines) + "\n"


def _verdict(ratio: float | None, lower: bool, err: float | None) -> str:
    """``better``, ``parity`` or ``worse`` than base: parity within ``PARITY`` or within the ratio's interval."""
    if ratio is None:
        return "none"
    slack = max(PARITY, err or 0.0)
    if abs(ratio - 1) <= slack:
        return "parity"
    return "better" if (ratio < 1) == lower else "worse"


_COLOURS = {"better": "#3a8f5c", "parity": "#8a8a8a", "worse": "#c8553d", "none": "#dddddd"}


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Bars of converted÷base per row, 1 = parity; green better than base, grey parity, red worse.

    A ratio within ``PARITY`` of 1, or within its interval, is parity: a perplexity ratio of 1.000 is not drawn as
    worse. Accuracy bars carry the interval of one binomial standard error (of the converted score, over the
    base's); every bar is labelled with its ratio and n. With a ``before`` column, each row has two bars: before
    recovery (hatched) and recovered. Lower-is-better metrics (perplexities, whose ratios reach 1e5 for an untrained
    conversion) get a log axis; scores such as accuracy a linear one, so a ratio of 0 (the passkey lost) still shows.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    items = list(results["tasks"].items())
    two = any("before" in r for _, r in items)
    panels = [[(n, r) for n, r in items if not r["higher_is_better"]], [(n, r) for n, r in items if r["higher_is_better"]]]
    panels = [p for p in panels if p]
    fig, axes = plt.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": [len(p) for p in panels]},
                             figsize=(max(4.0, (2.0 if two else 1.5) * len(items) + 1.5), 4.2))
    series = [("before_ratio", "before_stderr", "no recovery"), ("ratio", "converted_stderr", "recovered")] if two \
        else [("ratio", "converted_stderr", "converted")]
    width = 0.8 / len(series)
    for ax, rows in zip(axes[0], panels):
        lower = not rows[0][1]["higher_is_better"]
        if lower:
            ax.set_yscale("log")
        top = 1.2
        for j, (rkey, ekey, name) in enumerate(series):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))]
            ratios = [r.get(rkey) for _, r in rows]
            errs = [(r[ekey] / r["base"]) if r.get(ekey) is not None and r.get("base") else None for _, r in rows]
            shown = [v if v is not None and (v > 0 or not lower) else (1.0 if lower else 0.0) for v in ratios]
            colours = [_COLOURS[_verdict(v, lower, e)] for v, e in zip(ratios, errs)]
            bars = ax.bar(xs, shown, width=width, color=colours, hatch="//" if two and j == 0 else None,
                          edgecolor="white", label=name,
                          yerr=[e or 0.0 for e in errs] if any(e is not None for e in errs) else None,
                          capsize=3, error_kw={"elinewidth": 0.8})
            for bar, v, (_, r) in zip(bars, ratios, rows):
                n = r.get("samples")
                text = ("n/a" if v is None else _fmt(v)) + (f"\nn={n}" if n is not None else "")
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=7)
            top = max([top] + [1.25 * v for v in shown])
        if not lower:
            ax.set_ylim(0, top)
        ax.set_xticks(range(len(rows)), [f"{r.get('task', n)}\n{r['metric']}" for n, r in rows], fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_title("lower is better" if lower else "higher is better", fontsize=9)
    axes[0][0].set_ylabel("converted ÷ base")
    if two:
        axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("converted vs base (green: better, grey: parity, red: worse; bars: ±1 s.e.)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_results(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out_dir`` (created and marked as surgery's;
    never through a link, never over a file surgery did not write: ``surgery.outputs.write_owned``)."""
    from surgery.outputs import refuse_links_under, temporary_file, write_owned

    refuse_links_under(out_dir)
    st = results.get("settings", {})
    note = (f"\nlm-eval {st.get('lm_eval', '?')}, batch size {st.get('batch_size', '?')}, max length "
            f"{st.get('max_length', '?')}; wall time base {st.get('seconds', {}).get('base', '?')} s, converted "
            f"{st.get('seconds', {}).get('converted', '?')} s. Same tasks, documents and settings for both.\n")
    paths = {"json": write_owned(out_dir, "results.json", json.dumps(results, indent=1)),
             "md": write_owned(out_dir, "results.md", format_table(results) + note)}
    write_owned(out_dir, "results.png", b"")  # claims the name (refused if the user's), then the chart replaces it
    with temporary_file(out_dir / "results.png") as tmp:
        plot_results(results, tmp)
    paths["png"] = out_dir / "results.png"
    return paths
