"""The HF Trainer side of recovery: arguments from the spec, exact resume, attention transfer, the loss curve.

Resume is exact because every source of variation is either fixed or checkpointed: the packed chunks come in source
order, the Trainer's seedable sampler shuffles them with ``seed + epoch`` and skips the batches already seen, and a
checkpoint holds the adapters, the mixers' own parameters, the optimizer, the scheduler and the RNG states.

Nothing in a checkpoint is pickled: ``StageTrainer`` writes the optimizer, scheduler, grad-scaler and RNG states
through ``surgery.recover_state`` (JSON plus safetensors) and the training arguments as JSON, where the stock
Trainer would ``torch.save`` them, and reads them back on resume without ``torch.load``.
"""

from __future__ import annotations

import csv
import functools
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments
from transformers.training_args import ParallelMode
from transformers.utils import is_torch_xla_available

from surgery.mixer import Mixer
from surgery.recipes import RecoverSpec
from surgery.recover_lora import save_mixer_params
from surgery.recover_state import has_state, load_state, rng_states, save_state, set_rng_states

log = logging.getLogger("surgery.recover")

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINING_ARGS_FILE = "training_args.json"


def use_bf16(train: RecoverSpec.Train) -> bool:
    """bf16 autocast on CUDA under ``precision: auto``, fp32 on CPU; ``bf16`` / ``fp32`` force one."""
    bf16 = train.precision == "bf16" or (train.precision == "auto" and torch.cuda.is_available())
    if bf16 and not torch.cuda.is_available() and not cpu_has_bf16():
        log.warning("precision: bf16 on a CPU without AVX512-BF16 or AMX-BF16: its bf16 matmuls are emulated and "
                    "may be slower than fp32 (set precision: fp32)")
    return bf16


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), from ``/proc/cpuinfo`` (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: cannot tell cheaply
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def tokens_per_step(train: RecoverSpec.Train, seq_len: int) -> int:
    """Tokens one optimizer step consumes, over all processes (``WORLD_SIZE`` under torchrun / accelerate)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return train.batch_size * train.grad_accum * seq_len * world


def training_arguments(train: RecoverSpec.Train, output_dir: Path, seq_len: int) -> TrainingArguments:
    """``TrainingArguments`` of a stage: budget from ``tokens``, ``max_steps`` or ``epochs``; seeded, checkpointed."""
    max_steps = train.max_steps
    if train.tokens is not None:
        max_steps = math.ceil(train.tokens / tokens_per_step(train, seq_len))
    schedule = train.schedule
    if schedule == "constant" and train.warmup_steps:
        schedule = "constant_with_warmup"
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        lr_scheduler_type=schedule,
        warmup_steps=train.warmup_steps,
        max_steps=max_steps if max_steps is not None else -1,
        num_train_epochs=train.epochs,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        seed=train.seed,
        data_seed=train.seed,
        bf16=use_bf16(train),
        use_cpu=not cuda,
        activation_checkpointing=train.gradient_checkpointing,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.keep_checkpoints,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        report_to="none",
        remove_unused_columns=False,  # the model's forward is hidden behind peft: keep our two columns
        label_names=["labels"],
        dataloader_num_workers=0,
    )


def last_checkpoint(directory: Path) -> Path | None:
    """The newest *complete* ``checkpoint-N`` in ``directory``, or None.

    The Trainer writes ``trainer_state.json`` last, so a checkpoint cut short by a kill lacks it (or holds a
    truncated one) and is skipped in favour of the one before.
    """
    if not directory.is_dir():
        return None
    found = sorted(
        ((int(m.group(1)), p) for p in directory.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    for _, path in found:
        try:
            json.loads((path / "trainer_state.json").read_text())
            return path
        except (OSError, ValueError):
            log.warning("skipping incomplete checkpoint %s", path)
    return None


class StageTrainer(Trainer):
    """A Trainer with pickle-free checkpoints that also hold the mixers' own parameters (peft's adapter file does not).

    Per checkpoint, besides the adapter and ``trainer_state.json``: ``optimizer.{json,safetensors}``,
    ``scheduler.json``, ``scaler.json`` (fp16 only), ``rng_state.{json,safetensors}`` (``rng_state_<rank>.*`` under
    DDP) and ``training_args.json``. Single-process and DDP training only: DeepSpeed, FSDP and XLA keep their
    state in their own (pickled) formats and are refused.
    """

    def __init__(self, *args: Any, mixer_params: dict[str, nn.Parameter], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mixer_params = mixer_params
        backend = [n for n, on in (("DeepSpeed", self.is_deepspeed_enabled), ("FSDP", self.is_fsdp_enabled),
                                   ("XLA", is_torch_xla_available())) if on]  # fmt: skip
        if backend:
            raise ValueError(f"recover: training under {backend[0]} is not supported (its checkpoints are pickled); "
                             "run single-process or with DDP (torchrun / accelerate without FSDP or DeepSpeed)")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Inside save_model, so a checkpoint is only complete (trainer_state.json written) with these in it.
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            save_mixer_params(self.mixer_params, output_dir or self.args.output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Replaces the Trainer's _save, whose last act is torch.save(self.args, "training_args.bin").
        if not self.args.should_save:
            return
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.save_pretrained(str(out), state_dict=state_dict)  # peft: adapter_model.safetensors
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(out))
        (out / TRAINING_ARGS_FILE).write_text(self.args.to_json_string())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Under DDP every process holds the same optimizer state: the main one writes it.
        if self.args.should_save:
            save_state(self.optimizer.state_dict(), output_dir, "optimizer")
            save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            save_state(scaler.state_dict(), output_dir, "scaler")

    def _save_rng_state(self, output_dir: str) -> None:
        save_state(rng_states(self._distributed()), output_dir, self._rng_name())

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if not (has_state(checkpoint, "optimizer") and has_state(checkpoint, "scheduler")):
            raise ValueError(
                f"{checkpoint} holds no optimizer.json / scheduler.json (a checkpoint of a stock Trainer, whose "
                "pickles surgery does not load?); resume=False starts the stage over"
            )
        # Tensors come back on the CPU; Optimizer.load_state_dict moves each to its parameter's device and dtype.
        self.optimizer.load_state_dict(load_state(checkpoint, "optimizer"))
        self.lr_scheduler.load_state_dict(load_state(checkpoint, "scheduler"))

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and has_state(checkpoint, "scaler"):
            scaler.load_state_dict(load_state(checkpoint, "scaler"))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        name = self._rng_name()
        if not has_state(checkpoint, name):
            log.warning("%s holds no %s.json (written by another number of processes?): resume is not exact",
                        checkpoint, name)
            return
        set_rng_states(load_state(checkpoint, name), self._distributed())

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _distributed(self) -> bool:
        return self.args.parallel_mode == ParallelMode.DISTRIBUTED


class AttentionTransfer:
    """Per-layer MSE between each converted layer and the attention it replaced, on the same inputs (LoLCATs).

    While active, a forward hook on every mixer runs the original attention module (the teacher, frozen) on the
    mixer's own call arguments, records ``mse(mixer(x), teacher(x))`` and hands the *teacher's* output on. Every
    layer therefore sees exactly the hidden states of the original model (teacher forcing), the layers train
    jointly in one forward pass yet independently, and gradients never cross layers.
    """

    def __init__(self, pairs: Sequence[tuple[str, Mixer, nn.Module]]) -> None:
        self.pairs = list(pairs)
        self.losses: list[Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> AttentionTransfer:
        for _, mixer, teacher in self.pairs:
            teacher.requires_grad_(False)
            teacher.eval()
            self._handles.append(mixer.register_forward_hook(self._hook(teacher), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.losses.clear()

    def _hook(self, teacher: nn.Module) -> Any:
        def hook(_mixer: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
            x = args[0] if args else kwargs["hidden_states"]
            ref = next(teacher.parameters(), None)
            if ref is not None and ref.device != x.device:
                teacher.to(x.device)  # the Trainer moves the student, not the teacher
            with torch.no_grad():
                target = teacher(*args, **kwargs)[0]
            self.losses.append(F.mse_loss(output[0].float(), target.float()))
            return (target, *output[1:])

        return hook

    def loss(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """Sum over converted layers of the mean squared error on ``input_ids`` ``[B, T]``."""
        self.losses.clear()
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if _accepts(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1  # the logits are unused: skip most of the LM head
        model(**kwargs)
        if len(self.losses) != len(self.pairs):
            raise RuntimeError(f"attention transfer: {len(self.losses)} of {len(self.pairs)} converted layers ran")
        out = torch.stack(self.losses).sum()
        self.losses.clear()
        return out


def _accepts(model: nn.Module, name: str) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(inner.forward).parameters


class TransferTrainer(StageTrainer):
    """The attention-transfer stage: the loss is ``AttentionTransfer.loss``, a per-batch mean (scaled for GA here)."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, transfer: AttentionTransfer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transfer = transfer

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, Any]:
        loss = self.transfer.loss(model, inputs["input_ids"])
        return (loss, None) if return_outputs else loss


class DistillTrainer(StageTrainer):
    """``train.loss: distill``: KL(teacher || student) of the next-token distributions, mean over scored positions.

    The teacher is the unconverted model (frozen, no grad), run on the same batch. Positions whose label is -100
    (prompt tokens of instruction data) are not scored, as with cross-entropy.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, teacher: nn.Module, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, Any]:
        ids = inputs["input_ids"]
        ref = next(self.teacher.parameters())
        if ref.device != ids.device:
            self.teacher.to(ids.device)  # the Trainer moves the student, not the teacher
        out = model(input_ids=ids, use_cache=False)
        with torch.no_grad():
            target = self.teacher(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        mask = inputs["labels"][:, 1:] != -100  # [B, T-1]: logits at t predict the token at t+1
        student = out.logits[:, :-1].float().log_softmax(-1)
        kl = F.kl_div(student[mask], target[mask], log_target=True, reduction="batchmean")
        return (kl, out) if return_outputs else kl


def write_loss_curve(history: Sequence[dict[str, Any]], step_tokens: int, directory: Path, title: str) -> None:
    """``loss.csv`` (step, tokens, loss, lr) and ``loss.png`` from the Trainer's log history."""
    rows = [
        (int(e["step"]), int(e["step"]) * step_tokens, float(e["loss"]), float(e.get("learning_rate", float("nan"))))
        for e in history
        if "loss" in e and "step" in e
    ]
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "loss.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "tokens", "loss", "lr"])
        writer.writerows(rows)
    if not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: wrote loss.csv but no loss.png")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r[1] for r in rows], [r[2] for r in rows], lw=1.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(directory / "loss.png")
    plt.close(fig)
