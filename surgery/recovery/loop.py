"""Recovery: train a converted model back towards its base quality (LoRA with peft on the HF Trainer).

Stages, run in the order the plan lists them (``recover.stages``):

- ``attention_transfer`` (optional, LoLCATs stage 1): each converted layer learns to reproduce the output of the
  attention it replaced (MSE, teacher-forced; see ``recover_train.AttentionTransfer``).
- ``lora`` (Liger's recipe): next-token cross-entropy on packed text, LoRA on q/k/v of every converted layer.

Both stages train the same parameters: LoRA adapters on the converted layers plus the mixers' own parameters.

Layout of ``out_dir``::

    spec.json                  the resolved recover section; resuming with another one is refused
    <stage>/                   per stage: checkpoints/, adapter/ (its result), loss.csv, loss.png, done.json
    loss.csv, loss.png         the last stage's curve: step, tokens, loss, lr
    adapter/                   the final adapter: adapter_model.safetensors, adapter_config.json and
                               mixer_params.safetensors (the mixers' own parameters, when they have any)
    merged/                    surgery.save of the merged model (``save_merged: true``)

The returned model carries ``surgery_recover_report``: steps, tokens, final loss and seconds per stage.

A run killed at any point continues from its last complete checkpoint when started again with the same arguments
and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import TrainerCallback, default_data_collator

from surgery.recipes import RecoverSpec
from surgery.recover_data import PackedChunks, load_chunks
from surgery.recover_lora import (
    find_mixers,
    inject_lora,
    load_adapter_weights,
    load_mixer_params,
    lora_config,
    save_mixer_params,
)
from surgery.recover_train import (
    AttentionTransfer,
    DistillTrainer,
    StageTrainer,
    TransferTrainer,
    last_checkpoint,
    tokens_per_step,
    training_arguments,
    use_bf16,
    write_loss_curve,
)

log = logging.getLogger("surgery.recovery")

STAGES = ("attention_transfer", "lora")


def recover(
    model: nn.Module,
    plan: Any = None,
    *,
    spec: RecoverSpec | None = None,
    tokenizer: Any = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    teacher_model: nn.Module | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> nn.Module:
    """Train the converted layers of ``model`` as ``spec`` (or ``plan.recover``) says; return the trained model.

    Args:
        model: a converted HF causal LM (some attention modules replaced by ``surgery.mixer.Mixer``). Trained in
            place; on CPU a half-precision model is cast to fp32 first (``train.precision: auto``).
        plan: a ``surgery.plan.Plan``; gives ``recover`` (unless ``spec`` is given), the tokenizer and teacher
            (``plan.model``) and the output directory (``<plan.output>/recover``). May be None.
        spec: the recover section to use instead of the plan's.
        tokenizer: defaults to ``AutoTokenizer.from_pretrained(plan.model)``.
        out_dir: where checkpoints and outputs go (see the module docstring). Default ``<plan.output>/recover``,
            else a fresh temporary directory (no resume possible).
        resume: continue from the last complete checkpoint in ``out_dir``; False starts over (and deletes the
            stage directories this function wrote there before).
        teacher_model: the unconverted model, for ``attention_transfer`` (default: loaded from ``plan.model``).
        callbacks: extra ``transformers.TrainerCallback`` objects, given to every stage's Trainer.

    Returns:
        The model with LoRA merged into its weights (``spec.merge``, the default), else the ``PeftModel``.

    Raises:
        ValueError: no converted layer, a converted layer would get no adapter, unusable data, or ``out_dir``
            holds a run of a different spec.
    """
    spec = _resolve_spec(plan, spec)
    lora_config(model, spec.lora)  # refuse a model or targets that leave a converted layer bare, before any work
    out = _resolve_out_dir(plan, out_dir)
    _claim(out, spec, resume)
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(plan, model)
    chunks = load_chunks(spec.data, tokenizer)

    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    first = spec.transfer if spec.stages[0] == "attention_transfer" else spec.train
    if not use_bf16(first) and any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        log.info("casting the model to float32 for training on %s", "CPU" if not torch.cuda.is_available() else "GPU")
        model.float()
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # training never decodes; a cache would only hold recurrent states in vain

    peft_model, extra = inject_lora(model, spec.lora, seed=spec.train.seed)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("recover: %d converted layers, %d trainable parameters (%d in mixers' own parameters), stages %s",
             len(find_mixers(model)), n_train, sum(p.numel() for p in extra.values()), list(spec.stages))

    report: dict[str, Any] = {"out_dir": str(out), "trainable_params": n_train, "stages": {}}
    try:
        for stage in spec.stages:
            finished = resume and (out / stage / "done.json").exists()  # reloaded, not retrained: no teacher needed
            teacher = None
            if not finished and (stage == "attention_transfer" or spec.train.loss == "distill"):
                teacher = teacher_model = _teacher_model(model, plan, teacher_model)  # loaded once for both stages
            common = (peft_model, extra, chunks)
            if stage == "attention_transfer":
                pairs = _teacher_pairs(model, teacher) if teacher is not None else []
                result = _run_stage(stage, *common, spec.transfer, out / stage, resume, callbacks, pairs)
            else:
                result = _run_stage(stage, *common, spec.train, out / stage, resume, callbacks, None, teacher=teacher)
            report["stages"][stage] = result
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    final = out / "adapter"
    if _is_main():  # under torchrun every process trained the same weights; one writes them
        last = out / spec.stages[-1]
        for name in ("loss.csv", "loss.png"):  # the run's curve at the top: the last stage's
            if (last / name).exists():
                shutil.copyfile(last / name, out / name)
        peft_model.save_pretrained(str(final))
        save_mixer_params(extra, final)
    report.update(adapter=str(final), steps=sum(r["steps"] for r in report["stages"].values()),
                  tokens=sum(r["tokens"] for r in report["stages"].values()))
    if not spec.merge:
        peft_model.surgery_recover_report = report
        return peft_model
    merged = peft_model.merge_and_unload()
    for name, param in merged.named_parameters():
        param.requires_grad_(grad_flags.get(name, param.requires_grad))
    merged.eval()
    merged.surgery_recover_report = report  # read by surgery.pipeline for the model card
    if spec.save_merged and _is_main():
        _save_merged(merged, out / "merged", tokenizer)
    return merged


def load_adapter(model: nn.Module, adapter_dir: str | Path, *, merge: bool = True) -> nn.Module:
    """Apply an adapter written by ``recover`` (``<out>/adapter``) to a converted model.

    Loads the LoRA tensors with peft and the mixers' own parameters from ``mixer_params.safetensors``; returns
    the merged model (or the ``PeftModel`` when ``merge`` is False).
    """
    adapter_dir = Path(adapter_dir)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    load_mixer_params(peft_model.get_base_model(), adapter_dir)
    return peft_model.merge_and_unload() if merge else peft_model


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _resolve_spec(plan: Any, spec: RecoverSpec | None) -> RecoverSpec:
    if spec is not None:
        return spec if isinstance(spec, RecoverSpec) else RecoverSpec.model_validate(spec)
    section = getattr(plan, "recover", None) if plan is not None else None
    return section if section is not None else RecoverSpec()


def _resolve_out_dir(plan: Any, out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    output = getattr(plan, "output", None) if plan is not None else None
    if output:
        return Path(output) / "recover"
    path = Path(tempfile.mkdtemp(prefix="surgery-recover-"))
    log.warning("recover: no out_dir and no plan.output; writing to %s (a rerun cannot resume from it)", path)
    return path


def _claim(out: Path, spec: RecoverSpec, resume: bool) -> None:
    """Make ``out`` this spec's directory: refuse to resume a different spec, clear our outputs when not resuming."""
    out.mkdir(parents=True, exist_ok=True)
    spec_file = out / "spec.json"
    current = spec.model_dump(mode="json")
    if resume and spec_file.exists():
        changed = _weight_changes(json.loads(spec_file.read_text()), current)
        if changed:
            raise ValueError(
                f"{out} holds a recovery run with a different recover section (differs in: {', '.join(changed)}); "
                f"use another out_dir, or resume=False to start over there"
            )
    if _is_main():
        if not resume:
            for name in (*STAGES, "adapter", "merged"):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in ("loss.csv", "loss.png"):
                (out / name).unlink(missing_ok=True)
        spec_file.write_text(json.dumps(current, indent=1))


# Settings that do not change the trained weights: a resumed run may differ in them.
_NEUTRAL = {"merge", "save_merged", "train.save_steps", "train.keep_checkpoints", "train.logging_steps",
            "transfer.save_steps", "transfer.keep_checkpoints", "transfer.logging_steps"}


def _weight_changes(previous: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two dumped specs, ignoring ``_NEUTRAL`` ones."""
    changed = []
    for key in sorted(set(previous) | set(current)):
        a, b, path = previous.get(key), current.get(key), prefix + key
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _weight_changes(a, b, path + ".")
        elif a != b and path not in _NEUTRAL:
            changed.append(path)
    return changed


def _load_tokenizer(plan: Any, model: nn.Module) -> Any:
    from transformers import AutoTokenizer

    source = getattr(plan, "model", None) if plan is not None else None
    source = source or getattr(model.config, "_name_or_path", None)
    if not source:
        raise ValueError("recover(): pass tokenizer=, or a plan whose model names one")
    return AutoTokenizer.from_pretrained(source)


def _teacher_model(model: nn.Module, plan: Any, teacher_model: nn.Module | None) -> nn.Module:
    """The unconverted model in the student's dtype: ``teacher_model`` when given, else loaded from ``plan.model``."""
    dtype = model.get_input_embeddings().weight.dtype  # the hidden states' dtype, which the teacher will see
    if teacher_model is not None:
        return teacher_model.to(dtype=dtype)
    source = getattr(plan, "model", None) if plan is not None else None
    if not source:
        raise ValueError("recover: attention_transfer and train.loss=distill need the original model as teacher: "
                         "pass teacher_model=, or a plan naming the model")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)


def _teacher_pairs(model: nn.Module, teacher_model: nn.Module) -> list[tuple[str, Any, nn.Module]]:
    """(path, mixer, original attention) for every converted layer, the originals taken from the base model."""
    pairs = []
    for path, mixer in find_mixers(model):
        try:
            teacher = teacher_model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"attention_transfer: the teacher model has no module '{path}'") from None
        if find_mixers(teacher):  # a Mixer itself, or a module holding one
            raise ValueError(f"attention_transfer: the teacher's '{path}' is converted too; pass the original model")
        pairs.append((path, mixer, teacher))
    return pairs


def _run_stage(
    stage: str,
    peft_model: PeftModel,
    extra: dict[str, nn.Parameter],
    chunks: PackedChunks,
    train: RecoverSpec.Train,
    stage_dir: Path,
    resume: bool,
    callbacks: Sequence[TrainerCallback],
    pairs: list[tuple[str, Any, nn.Module]] | None,
    teacher: nn.Module | None = None,
) -> dict[str, Any]:
    """Run one stage to its end, resuming from its last checkpoint; a finished stage only reloads its result.

    Returns:
        ``{"steps", "tokens", "final_loss", "seconds"}`` of the stage (also kept in ``<stage>/done.json``).
    """
    done = stage_dir / "done.json"
    result = stage_dir / "adapter"
    if resume and done.exists():
        log.info("%s: already finished in %s; loading its adapter", stage, stage_dir)
        load_adapter_weights(peft_model, result)
        return json.loads(done.read_text())
    adapters = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    if stage == "attention_transfer" and getattr(train, "train", "adapters") == "mixer_params":
        if not extra:
            raise ValueError("recover.transfer.train is mixer_params, but the mixers have no parameters of their own")
        for p in adapters:
            p.requires_grad_(False)

    t0 = time.perf_counter()
    args = training_arguments(train, stage_dir / "checkpoints", chunks.seq_len)
    common = dict(model=peft_model, args=args, train_dataset=chunks, data_collator=default_data_collator,
                  callbacks=list(callbacks), mixer_params=extra)
    ckpt = last_checkpoint(stage_dir / "checkpoints") if resume else None
    if ckpt is not None:
        log.info("%s: resuming from %s", stage, ckpt)
        load_mixer_params(peft_model.get_base_model(), ckpt, expected=list(extra))
    try:
        if pairs is not None:
            with AttentionTransfer(pairs) as transfer:
                trainer = TransferTrainer(**common, transfer=transfer)
                trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        else:
            trainer = StageTrainer(**common) if teacher is None else DistillTrainer(**common, teacher=teacher)
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    finally:
        for p in adapters:
            p.requires_grad_(True)

    step_tokens = tokens_per_step(train, chunks.seq_len)
    history = trainer.state.log_history
    write_loss_curve(history, step_tokens, stage_dir, f"recover: {stage}")
    losses = [float(e["loss"]) for e in history if "loss" in e]
    steps = trainer.state.global_step
    summary = {"steps": steps, "tokens": steps * step_tokens,
               "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
               "seconds": round(time.perf_counter() - t0, 1)}
    if trainer.args.should_save:
        peft_model.save_pretrained(str(result))
        save_mixer_params(extra, result)
        done.write_text(json.dumps(summary))
    return summary


def _save_merged(model: nn.Module, path: Path, tokenizer: Any) -> None:
    try:
        from surgery.artifacts import save
    except ImportError:  # artifacts is written by another part of the project; recover works without it
        log.warning("surgery.artifacts.save is unavailable: the merged model was not written to %s", path)
        return
    save(model, path, tokenizer=tokenizer)
