"""The run context and ``run``: convert -> recover -> evaluate -> save, in one direction.

A ``Run`` owns the plan, the output paths (``surgery.outputs.run_paths``: one function for the CLI and the API), the
tokenizer and the base model. The base weights are read from disk at most once per run: the model is converted
from an in-memory copy, and the base itself serves as the recovery teacher and the evaluation baseline (moved
between devices as needed, never reloaded). Stages return typed results; only the save step writes a model, once.

Under ``torchrun`` / ``accelerate launch`` every process converts and recovers (recovery is the distributed part);
rank 0 alone claims the output, evaluates, samples and writes the model, the card and the report, while the other
processes end once recovery has (they skip the rest, so a long evaluation cannot time out a waiting collective).

The stage commands (``surgery convert``, ``recover``, ``eval``) are methods of the same context, so a plan with no
``output:`` means ``runs/surgery`` for all of them, and ``recover`` always starts from the converted model (never
from a recovered one, whose adapters are already merged).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from surgery.artifacts import load, save
from surgery.convert import convert, load_model, load_tokenizer
from surgery.outputs import (OutputError, OutputLock, check_writable, claim_dir, refuse_links_under, run_paths,
                             write_owned)  # fmt: skip
from surgery.plan import Plan
from surgery.recovery.distributed import is_main, world_size

SAMPLE_PROMPT = "The capital of France is"


@dataclass
class RunReport:
    """What ``run`` did: wall seconds per step, the recovery and evaluation results, a greedy sample."""

    wall_s: dict[str, float] = field(default_factory=dict)
    recover: Any = None  # surgery.recovery.loop.RecoverResult
    eval: Any = None  # surgery.evaluate.EvalResult
    sample_prompt: str = SAMPLE_PROMPT
    sample: str | None = None
    model_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"wall_s": self.wall_s, "recover": self.recover.to_dict() if self.recover is not None else None,
                "eval": self.eval, "sample_prompt": self.sample_prompt, "sample": self.sample,
                "model_dir": str(self.model_dir) if self.model_dir else None}  # fmt: skip


class Run:
    """One run of a plan: its paths, its tokenizer and its base model, each made at most once.

    Args:
        plan: a plan from ``surgery.load_plan``.
        output: overrides the plan's ``output:`` (``runs/surgery`` when neither is set).
        base_model: the unconverted model, when the caller has it in memory (then nothing is read from disk).
        force: write into a non-empty directory that surgery did not create.
    """

    def __init__(
        self, plan: Plan, *, output: str | Path | None = None, base_model: nn.Module | None = None, force: bool = False
    ) -> None:
        self.plan = plan  # carries the registry it was validated against: the run's one registry
        self.paths = run_paths(plan, output)
        self.force = force
        self._base = base_model
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The plan's tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.plan)
        return self._tokenizer

    def base_model(self) -> nn.Module:
        """The unconverted model, loaded from disk on first use and kept (teacher and evaluation baseline)."""
        if self._base is None:
            self._base = load_model(self.plan)
        return self._base

    def converted(self) -> nn.Module:
        """A freshly converted copy of the base model (the base itself stays unconverted)."""
        return convert(self.plan, copy.deepcopy(self.base_model()))

    def saved_or_converted(self) -> nn.Module:
        """The converted model of ``surgery convert`` (``<output>/convert``), else converted now."""
        if (self.paths.convert / "config.json").exists():
            model = load(self.paths.convert, registry=self.plan.registry)
            from surgery.recovery.loop import converted_by

            stored, wanted = converted_by(model), {k: v for k, v in self.plan.to_dict().items() if k in ("convert", "dtype")}
            if stored != wanted:
                keys = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
                raise OutputError(f"{self.paths.convert} was converted by a different plan (differs in: "
                                  f"{', '.join(keys)}); run surgery convert again (or remove it) to use this one")
            return model
        print(f"[surgery] no converted model in {self.paths.convert}; converting now", flush=True)
        return self.converted()

    def final_or_converted(self) -> nn.Module:
        """The newest finished model: ``<output>/model`` (recovered), else ``<output>/convert``."""
        for path in (self.paths.model, self.paths.convert):
            if (path / "config.json").exists():
                return load(path, registry=self.plan.registry)
        raise OutputError(f"{self.paths.root} holds no model to evaluate: run surgery convert or surgery run first")

    def recover(self, model: nn.Module, resume: bool = True, callbacks: Any = ()) -> Any:
        from surgery.recovery.loop import recover

        if self.plan.recover is None:
            raise OutputError("the plan has no recover: section")
        return recover(model, self.plan.recover, self.tokenizer, self.paths.recover, self.base_model, resume=resume,
                       callbacks=callbacks)  # fmt: skip

    def evaluate(self, model: nn.Module, limit: float | None = None, before: Any = None) -> Any:
        from surgery.evaluate import evaluate

        if self.plan.eval is None:
            raise OutputError("the plan has no eval: section")
        return evaluate(model, self.plan.eval, self.base_model(), self.tokenizer, self.paths.eval, limit=limit,
                        before=before)  # fmt: skip

    def score_before_recovery(self, model: nn.Module, limit: float | None = None) -> Any:
        """The converted model's evaluation before recovery changes it (``evaluate``'s ``before``), or None when the
        run does not both recover and evaluate, or the plan turned it off (``eval.before_recovery``)."""
        spec = self.plan.eval
        if self.plan.recover is None or spec is None or not spec.before_recovery:
            return None
        from surgery.evaluate import _spec, score

        print("[surgery] scoring the converted model before recovery", flush=True)
        return score(model, self.tokenizer, _spec(spec, None, limit))

    def save(self, model: nn.Module, path: Path, card: str | None = None) -> Path:
        extra = {"README.md": card} if card is not None else None
        # The tokenizer this run loaded; else save() looks for the plan's locally (a model may have none).
        return save(model, path, tokenizer=self._tokenizer, extra_files=extra, force=self.force)


def generate_sample(model: Any, tokenizer: Any, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 24) -> str:
    """Greedy continuation of ``prompt`` through the model's cache (a smoke test of decoding)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def run(
    plan: Plan, *, output: str | Path | None = None, model: nn.Module | None = None, limit: float | None = None,
    force: bool = False,
) -> RunReport:  # fmt: skip
    """Run every step the plan has; returns the ``RunReport`` (also written to ``<output>/report.json``).

    Args:
        model: the unconverted model in memory (else ``plan.model`` is loaded, once).
        limit: documents per evaluation task (overrides the plan's).
        force: write into a non-empty directory that surgery did not create.
    """
    from surgery.card import model_card

    ctx = Run(plan, output=output, base_model=model, force=force)
    _saves_merged(plan)
    _not_the_base_model(plan, ctx.paths.root)
    root = _claim_root(ctx, force)
    report = RunReport()
    with OutputLock(root):
        for sub in (ctx.paths.recover, ctx.paths.eval):
            refuse_links_under(sub)
        t = time.perf_counter()
        converted = ctx.converted()
        report.wall_s["convert"] = time.perf_counter() - t
        print(f"[surgery] converted {len(converted.surgery.manifest)} layer(s) in {report.wall_s['convert']:.1f}s",
              flush=True)  # fmt: skip
        before: Any = None
        if plan.recover is not None and is_main():
            if world_size() > 1:  # score it after recovery, so no rank waits at a collective through an evaluation
                before = copy.deepcopy(converted) if plan.eval is not None and plan.eval.before_recovery else None
            else:
                t = time.perf_counter()
                before = ctx.score_before_recovery(converted, limit=limit)
                if before is not None:
                    report.wall_s["eval_before_recovery"] = time.perf_counter() - t
        if plan.recover is not None:
            t = time.perf_counter()
            report.recover = ctx.recover(converted)
            converted = report.recover.model
            report.wall_s["recover"] = time.perf_counter() - t
        if not is_main():
            return report  # rank 0 evaluates and writes; this process's part is done
        if plan.eval is not None:
            from surgery.evaluate import format_table

            t = time.perf_counter()
            report.eval = ctx.evaluate(converted, limit=limit, before=before)
            report.wall_s["eval"] = time.perf_counter() - t
            print(format_table(report.eval), flush=True)
        report.sample = generate_sample(converted, ctx.tokenizer, report.sample_prompt)
        print(f"[surgery] sample: {report.sample_prompt!r} -> {report.sample!r}", flush=True)
        t = time.perf_counter()
        report.model_dir = ctx.save(converted, ctx.paths.model, card=model_card(plan, converted, report))
        report.wall_s["save"] = time.perf_counter() - t
        write_owned(root, ctx.paths.card.name, model_card(plan, converted, report))
        write_owned(root, ctx.paths.report.name, json.dumps(report.to_dict(), indent=1, default=str))
    print(f"[surgery] saved to {ctx.paths.model}; model card {ctx.paths.card}", flush=True)
    return report


def _saves_merged(plan: Plan) -> None:
    """``surgery run`` and ``surgery recover`` save a model that loads alone: a plan asking for the unmerged
    ``PeftModel`` (the Python API's ``recover.merge: false``) is refused before any work."""
    if plan.recover is not None and not plan.recover.merge:
        from surgery.errors import PlanError

        raise PlanError([("recover.merge", "false returns the unmerged PeftModel to Python callers "
                                           "(surgery.recover); surgery run and surgery recover save a merged model, and "
                                           "the adapter is in <output>/recover/adapter either way: remove merge: false")])


def _not_the_base_model(plan: Plan, target: Path) -> None:
    """Refuse an output that is (or holds, or lies inside) the plan's own model directory: a save there would mix
    the converted model into the base model the plan reads."""
    model = Path(plan.model)
    if not model.exists():
        return  # a hub id: its files live in the HF cache, which surgery never writes
    a, b = model.resolve(), target.absolute().resolve()
    if a == b or a in b.parents or b in a.parents:
        raise OutputError(f"output {target} is the plan's own model directory {plan.model} (or holds it); choose "
                          "another output")  # fmt: skip


def convert_command(plan: Plan, output: str | Path | None = None, force: bool = False) -> Path:
    """``surgery convert``: convert and save to ``<output>/convert`` (or ``output`` itself when given), under the
    run's lock (a ``recover`` of the same run cannot see ``convert/`` replaced under it)."""
    ctx = Run(plan, force=force)
    target = Path(output) if output is not None else ctx.paths.convert
    _not_the_base_model(plan, target)
    check_writable(target, force)  # before the work, not after it
    if output is None:
        root = _claim_root(ctx, force)
        lock = OutputLock(root)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(target.parent, name=f".{target.name}.lock")
    with lock:
        model = ctx.converted()
        ctx.save(model, target)
    return target


def recover_command(plan: Plan, restart: bool = False, force: bool = False) -> Path:
    """``surgery recover``: recover the converted model and save it to ``<output>/model``."""
    if plan.recover is None:
        raise OutputError("the plan has no recover: section")
    ctx = Run(plan, force=force)
    _saves_merged(plan)
    _not_the_base_model(plan, ctx.paths.root)
    root = _claim_root(ctx, force)
    with OutputLock(root):
        refuse_links_under(ctx.paths.recover)
        result = ctx.recover(ctx.saved_or_converted(), resume=not restart)
        if not is_main():
            return ctx.paths.model  # rank 0 writes the model
        return ctx.save(result.model, ctx.paths.model)


def recover_plan(
    model: nn.Module, plan: Plan | None = None, *, spec: Any = None, tokenizer: Any = None,
    out_dir: str | Path | None = None, teacher_model: Any = None, resume: bool = True, callbacks: Any = (),
) -> Any:  # fmt: skip
    """``surgery.recover(model, plan)``: the stage loop with its inputs resolved from ``plan`` by a ``Run``.

    Each argument given replaces what the plan would give: ``spec`` (a ``RecoverSpec`` or the section as a dict)
    for ``plan.recover``, ``tokenizer`` for the plan's, ``out_dir`` for ``<output>/recover``, ``teacher_model`` (a
    model, or a function returning one) for the plan's base model, loaded only if a stage needs it.
    """
    from surgery.recovery.loop import recover
    from surgery.recovery.spec import RecoverSpec

    if plan is None and (spec is None or tokenizer is None or out_dir is None):
        raise ValueError("recover: pass a plan, or spec=, tokenizer= and out_dir=")
    ctx = Run(plan) if plan is not None else None
    if not isinstance(spec, RecoverSpec):
        section = spec if spec is not None else (plan.recover if plan is not None else None)
        if section is None:
            raise OutputError("the plan has no recover: section")
        context = {"registry": plan.registry} if plan is not None else None
        spec = section if isinstance(section, RecoverSpec) else RecoverSpec.model_validate(section, context=context)
    teacher = teacher_model if teacher_model is not None else (ctx.base_model if ctx is not None else None)
    return recover(model, spec, tokenizer if tokenizer is not None else ctx.tokenizer,
                   out_dir if out_dir is not None else ctx.paths.recover, teacher, resume=resume,
                   callbacks=callbacks)  # fmt: skip


def evaluate_plan(
    model: nn.Module, plan: Plan | None = None, *, base_model: nn.Module | None = None, tokenizer: Any = None,
    tasks: list[str] | None = None, limit: float | None = None, out_dir: str | Path | None = None,
) -> Any:  # fmt: skip
    """``surgery.evaluate(model, plan)``: lm-eval with its inputs resolved from ``plan`` by a ``Run``.

    Each argument given replaces what the plan would give: ``base_model`` (else loaded from ``plan.model``),
    ``tokenizer``, ``tasks`` and ``limit`` (over ``plan.eval``), ``out_dir`` (else ``<output>/eval`` when the
    plan names an output, else nothing is written).
    """
    from surgery.evaluate import evaluate

    if plan is None and (base_model is None or tokenizer is None):
        raise ValueError("evaluate: pass a plan, or base_model= and tokenizer=")
    ctx = Run(plan, base_model=base_model) if plan is not None else None
    out = out_dir if out_dir is not None or plan is None or not plan.output else ctx.paths.eval
    return evaluate(model, plan.eval if plan is not None else None,
                    base_model if base_model is not None else ctx.base_model(),
                    tokenizer if tokenizer is not None else ctx.tokenizer, out, tasks=tasks, limit=limit)  # fmt: skip


def _claim_root(ctx: Run, force: bool) -> Path:
    """Rank 0 claims the run's directory; under torchrun the others wait for it (they would race its checks)."""
    from surgery.recovery.distributed import barrier, init

    init()
    root = claim_dir(ctx.paths.root, force=force) if is_main() else ctx.paths.root
    barrier()
    return root


def eval_command(plan: Plan, limit: float | None = None) -> Any:
    """``surgery eval``: evaluate the run's newest model next to the base model."""
    if plan.eval is None:
        raise OutputError("the plan has no eval: section")
    ctx = Run(plan)
    check_writable(ctx.paths.root)  # eval writes <output>/eval: only into a directory surgery made (before work)
    model = ctx.final_or_converted()
    with OutputLock(_claim_root(ctx, force=False)):
        return ctx.evaluate(model, limit=limit)


__all__ = ["Run", "RunReport", "convert_command", "eval_command", "evaluate_plan", "generate_sample", "recover_command",
           "recover_plan", "run"]
