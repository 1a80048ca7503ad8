"""The stage loop: train a converted model back towards its base quality, stage after stage, resumably.

Stages are registered units (``surgery.recovery.stage``): the plan lists them in order under ``recover.stages``;
every stage trains the same parameters, the LoRA adapters on the converted layers plus the mixers' own parameters.

Layout of ``out``::

    spec.json                  the resolved recover section; resuming with one that changes the weights is refused
    <stage>/                   per stage: checkpoints/, adapter/ (its result), loss.csv, loss.png, done.json
    loss.csv, loss.png         the last stage's curve: step, tokens, loss, lr
    adapter/                   the final adapter: adapter_model.safetensors, adapter_config.json and
                               mixer_params.safetensors (the mixers' own parameters, when they have any)
    previous-<time>/           an earlier run moved aside by ``resume=False`` (never deleted)

A run killed at any point continues from its last complete checkpoint when started again with the same arguments
and ends with the same weights as an uninterrupted run. ``recover`` returns a typed ``RecoverResult``.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, default_data_collator

from surgery.mixer import Mixer
from surgery.outputs import OutputError, OutputLock, refuse_links_under, write_file
from surgery.recovery.adapters import find_mixers, inject_lora, load_adapter_weights, load_mixer_params, lora_config
from surgery.recovery.data import PackedChunks, load_chunks
from surgery.recovery.distributed import barrier, init, is_main, is_sharded, shards, skeleton, unsharded
from surgery.recovery.spec import RecoverSpec
from surgery.recovery.stage import NEUTRAL_TRAIN_KEYS
from surgery.recovery.stage import Stage, StageContext, StageResult
from surgery.recovery.trainer import last_checkpoint, mixer_stats, reset_mixer_stats, tokens_per_step, training_arguments
from surgery.recovery.trainer import use_bf16, write_loss_curve

log = logging.getLogger("surgery.recovery")

Teacher = nn.Module | Callable[[], nn.Module] | None


@dataclass
class RecoverResult:
    """What ``recover`` did: the trained model and, per stage, its ``StageResult``."""

    model: nn.Module
    stages: dict[str, StageResult]
    adapter: Path
    out_dir: Path
    trainable_params: int

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.stages.values())

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.stages.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (the model left out)."""
        return {"out_dir": str(self.out_dir), "adapter": str(self.adapter), "trainable_params": self.trainable_params,
                "steps": self.steps, "tokens": self.tokens,
                "stages": {k: asdict(v) for k, v in self.stages.items()}}  # fmt: skip


def recover(
    model: nn.Module,
    spec: RecoverSpec,
    tokenizer: Any,
    out: str | Path,
    teacher: Teacher = None,
    *,
    resume: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
) -> RecoverResult:
    """Train the converted layers of ``model`` as ``spec`` says; takes what it needs, resolved.

    ``surgery.recover(model, plan)`` and ``surgery.pipeline.Run`` resolve these from a plan (its ``recover:``
    section, its tokenizer, ``<output>/recover``, its base model, loaded once).

    Args:
        model: a converted HF causal LM (some attention modules replaced by ``surgery.mixer.Mixer``). Trained in
            place; on CPU a half-precision model is cast to fp32 first (``precision: auto``).
        spec: the ``recover:`` section (a validated ``RecoverSpec``, its stages resolved).
        tokenizer: the tokenizer of the training text.
        out: where checkpoints and outputs go (see the module docstring).
        teacher: the unconverted model, or a function returning it (called only when a stage that still has to
            train needs it); None when no stage needs one. Never changed: a teacher in another dtype than the
            student is copied in the student's.
        resume: continue from the last complete checkpoint in ``out``; False moves an earlier run there aside
            (``previous-<time>/``) and starts over.
        callbacks: extra ``transformers.TrainerCallback`` objects, given to every stage's Trainer.

    Returns:
        A ``RecoverResult`` whose ``model`` has LoRA merged into its weights (``spec.merge``, the default), else the
        ``PeftModel``.

    Raises:
        ValueError: no converted layer, a converted layer would get no adapter, unusable data, or ``out``
            holds a run of a different spec that already trained.
        surgery.errors.OutputError: another process is recovering into ``out``.
        surgery.errors.TrainingDiverged: a non-finite loss or gradient.
    """
    lora_config(model, spec.lora)  # refuse a model or targets that leave a converted layer bare, before any work
    init()  # under torchrun / accelerate launch: the process group, before the first barrier
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):  # taken by rank 0 only (surgery.outputs): the processes of one run share the directory
        refuse_links_under(out)  # the Trainer, peft and shutil below would follow a planted link
        _claim(out, spec, resume, model)
        chunks = load_chunks(spec.data, tokenizer)
        return _train(model, spec, chunks, out, resume, teacher, callbacks)


def _train(
    model: nn.Module,
    spec: RecoverSpec,
    chunks: PackedChunks,
    out: Path,
    resume: bool,
    teacher_model: Teacher,
    callbacks: Sequence[TrainerCallback],
) -> RecoverResult:
    stages = spec.stage_objects()
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if not use_bf16(stages[0].options) and any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        log.info("casting the model to float32 for training on %s", "GPU" if torch.cuda.is_available() else "CPU")
        model.float()
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # training never decodes; a cache would only hold recurrent states in vain

    peft_model, extra = inject_lora(model, spec.lora, seed=stages[0].options.seed)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("recover: %d converted layers, %d trainable parameters (%d in mixers' own parameters), stages %s",
             len(find_mixers(model)), n_train, sum(p.numel() for p in extra.values()), list(spec.stages))
    # FSDP shards the model in place and has no way back: rank 0 keeps a weightless copy to gather into.
    shell = skeleton(peft_model) if shards(spec.distributed) and is_main() else None
    results: dict[str, StageResult] = {}
    teacher: nn.Module | None = None
    try:
        for stage in stages:
            finished = resume and (out / stage.name / "done.json").exists()  # reloaded, not retrained
            if not finished and stage.needs_teacher() and teacher is None:
                teacher = _teacher(model, teacher_model, stage.name)  # once for every stage that needs it
            ctx = StageContext(model=model, peft_model=peft_model, mixer_params=extra, chunks=chunks,
                               teacher=teacher if stage.needs_teacher() else None)  # fmt: skip
            results[stage.name] = _run_stage(stage, ctx, out / stage.name, resume, callbacks, spec.distributed)
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    final = out / "adapter"
    if is_main():  # the last stage's adapter (written by rank 0) is the run's, and its curve the run's curve
        last = out / stages[-1].name
        for name in ("loss.csv", "loss.png"):
            if (last / name).exists():
                shutil.copyfile(last / name, out / name)
        final.mkdir(exist_ok=True)
        for f in (last / "adapter").iterdir():
            shutil.copyfile(f, final / f.name)
    barrier()
    if is_sharded(peft_model):  # every process gathers; rank 0 gets the whole model, the others keep their shards
        whole = unsharded(peft_model, shell)
        if whole is None:
            return RecoverResult(peft_model, results, final, out, n_train)
        peft_model = whole
    result = RecoverResult(peft_model, results, final, out, n_train)
    if spec.merge:
        merged = peft_model.merge_and_unload()
        for name, param in merged.named_parameters():
            param.requires_grad_(grad_flags.get(name, param.requires_grad))
        result.model = merged.eval()
    return result


def load_adapter(model: nn.Module, adapter_dir: str | Path, *, merge: bool = True) -> nn.Module:
    """Apply an adapter written by ``recover`` (``<out>/adapter``) to a converted model.

    Loads the LoRA tensors and the mixers' own parameters from safetensors only (a ``.bin`` is refused); returns the
    merged model (or the ``PeftModel`` when ``merge`` is False).
    """
    from surgery.recovery.adapters import wrap_for_adapter

    adapter_dir = Path(adapter_dir)
    peft_model = wrap_for_adapter(model, adapter_dir)
    load_adapter_weights(peft_model, adapter_dir)
    return peft_model.merge_and_unload() if merge else peft_model


def _trained(out: Path) -> bool:
    """Whether ``out`` holds any finished stage or checkpoint (a run that never trained a step blocks nothing)."""
    return any(out.glob("*/done.json")) or any(out.glob("*/checkpoints/checkpoint-*"))


def converted_by(model: nn.Module) -> dict[str, Any]:
    """What a recovery's weights depend on besides its own section: the ``convert:`` rules (mixers, options, weight
    maps, layers) and the dtype of the plan ``model`` was converted by (empty for a model surgery did not convert)."""
    info = getattr(model, "surgery", None)
    plan = info.plan.to_dict() if info is not None and getattr(info, "plan", None) is not None else {}
    return {k: plan[k] for k in ("convert", "dtype") if k in plan}


def _claim(out: Path, spec: RecoverSpec, resume: bool, model: nn.Module | None = None) -> None:
    """Make ``out`` this spec's directory: refuse to resume a different trained spec (its recover section, or the
    conversion its model came from); move an old run aside.

    Every process checks, rank 0 writes, and no process goes on before it has (``barrier``).
    """
    spec_file = out / "spec.json"
    current = spec.model_dump(mode="json") | {"converted_by": converted_by(model) if model is not None else {}}
    if resume and spec_file.exists() and _trained(out):
        changed = _weight_changes(json.loads(spec_file.read_text()), current)
        if changed:
            raise OutputError(
                f"{out} holds a recovery run of a different plan (differs in: {', '.join(changed)}); "
                "use another output, or restart (surgery recover --restart, or resume=False), which moves the old "
                "run aside"
            )
    barrier()  # every process has read spec.json before rank 0 rewrites it
    if not is_main():
        barrier()
        return
    if not resume and _trained(out):
        aside = out / time.strftime("previous-%Y%m%d-%H%M%S")
        aside.mkdir()
        for p in out.iterdir():
            if p != aside and not p.name.startswith(("previous-", ".surgery")):
                p.rename(aside / p.name)
        log.warning("recover: the earlier run in %s was moved to %s", out, aside)
    write_file(spec_file, json.dumps(current, indent=1))
    barrier()


def _weight_changes(previous: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two dumped specs, ignoring settings that do not change weights."""
    changed = []
    for key in sorted(set(previous) | set(current)):
        a, b, path = previous.get(key), current.get(key), prefix + key
        neutral = path in ("merge", "distributed") or (path.startswith("stages.") and key in NEUTRAL_TRAIN_KEYS)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _weight_changes(a, b, path + ".")
        elif a != b and not neutral:
            changed.append(path)
    return changed


def _teacher(model: nn.Module, teacher: Teacher, stage: str) -> nn.Module:
    """The unconverted model in the student's dtype: ``teacher`` (or what it returns), copied when its dtype differs
    (the teacher is the run's shared base model: no consumer changes it)."""
    if callable(teacher) and not isinstance(teacher, nn.Module):
        teacher = teacher()
    if teacher is None:
        raise ValueError(f"recover: stage '{stage}' needs the original model as teacher: pass teacher=")
    dtype = model.get_input_embeddings().weight.dtype  # the hidden states' dtype, which the teacher will see
    if next(teacher.parameters()).dtype != dtype:
        teacher = copy.deepcopy(teacher).to(dtype=dtype)
    return teacher


def describe_stats(stats: dict[str, dict[str, Any]]) -> str:
    """One line on the mixers' counts: for MoM, the share of the busiest and the idlest memory over all layers."""
    shares = [c / max(sum(v["tokens_per_memory"]), 1) for v in stats.values() if "tokens_per_memory" in v
              for c in v["tokens_per_memory"]]  # fmt: skip
    if not shares:
        return f"{len(stats)} mixer(s) kept counts (see the report)"
    layers = sum("tokens_per_memory" in v for v in stats.values())
    return (f"MoM routing over {layers} layer(s): memory shares {min(shares):.3f} to {max(shares):.3f} of the "
            f"tokens (tokens per memory per layer in the report)")


def _run_stage(
    stage: Stage, ctx: StageContext, stage_dir: Path, resume: bool, callbacks: Sequence[TrainerCallback],
    distributed: str = "ddp",
) -> StageResult:  # fmt: skip
    """Run one stage to its end, resuming from its last checkpoint; a finished stage only reloads its result."""
    done = stage_dir / "done.json"
    result = stage_dir / "adapter"
    if resume and done.exists():
        log.info("%s: already finished in %s; loading its adapter", stage.name, stage_dir)
        load_adapter_weights(ctx.peft_model, result)
        return StageResult(**json.loads(done.read_text()))
    t0 = time.perf_counter()
    train = stage.options
    args = training_arguments(train, stage_dir / "checkpoints", ctx.chunks.seq_len, distributed, ctx.model)
    kwargs = dict(model=ctx.peft_model, args=args, train_dataset=ctx.chunks, data_collator=default_data_collator,
                  callbacks=list(callbacks), mixer_params=ctx.mixer_params)  # fmt: skip
    ckpt = last_checkpoint(stage_dir / "checkpoints") if resume else None
    if ckpt is not None:
        # Full tensors into the whole model on every process, before the Trainer exists: FSDP shards them out.
        log.info("%s: resuming from %s", stage.name, ckpt)
        load_adapter_weights(ctx.peft_model, ckpt)
        load_mixer_params(ctx.peft_model.get_base_model(), ckpt, expected=list(ctx.mixer_params))
    step_tokens = tokens_per_step(train, ctx.chunks.seq_len)
    reset_mixer_stats(ctx.model)
    for module in ctx.model.modules():
        if isinstance(module, Mixer):
            module.recompute = train.recompute_mixers
    with stage.trainer(ctx, **kwargs) as trainer:
        if is_main():
            print(f"recover {stage.name}: {trainer.engine()}", flush=True)
        try:
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        finally:  # a diverged or interrupted stage still leaves its curve up to where it stopped
            if is_main():
                write_loss_curve(trainer.state.log_history, step_tokens, stage_dir, f"recover: {stage.name}")
        trainer.save_adapter(result)  # gathered from every process, written by rank 0
    stats = mixer_stats(ctx.model)  # counted since this run of the stage began (a resume counts from there)
    if stats and is_main():
        print(f"recover {stage.name}: {describe_stats(stats)}", flush=True)
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    steps = trainer.state.global_step
    summary = StageResult(steps=steps, tokens=steps * step_tokens,
                          final_loss=sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                          seconds=round(time.perf_counter() - t0, 1),
                          extra={"mixer_stats": stats} if stats else {})  # fmt: skip
    if is_main():
        write_file(done, json.dumps(asdict(summary)))
    barrier()
    return summary
