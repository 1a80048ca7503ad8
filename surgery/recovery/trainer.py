"""The HF Trainer side of recovery: arguments from a stage's options, exact resume, the loss curve.

Resume is exact because every source of variation is either fixed or checkpointed: the packed chunks come in source
order, the Trainer's seedable sampler shuffles them with ``seed + epoch`` and skips the batches already seen, and a
checkpoint holds the adapters, the mixers' own parameters, the optimizer, the scheduler and the RNG states.

Nothing in a checkpoint is pickled: ``StageTrainer`` writes the optimizer, scheduler, grad-scaler and RNG states
through ``surgery.recovery.state`` (JSON plus safetensors) and the training arguments as JSON, where the stock
Trainer would ``torch.save`` them, and reads them back on resume without ``torch.load``.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments
from transformers.training_args import ParallelMode
from transformers.utils import is_torch_xla_available

from surgery.errors import DataError
from surgery.mixer import Mixer
from surgery.outputs import temporary_file, write_file
from surgery.recovery.stage import TrainOptions
from surgery.recovery.stage import TrainingDiverged
from surgery.recovery.adapters import save_mixer_params
from surgery.recovery.distributed import fsdp_arguments, full_tensors, load_optimizer_state, optimizer_state
from surgery.recovery.distributed import barrier, shards, split_batch, sum_counts
from surgery.recovery.distributed import world_size as dist_world_size
from surgery.recovery.state import has_state, load_state, rng_states, save_state, set_rng_states

log = logging.getLogger("surgery.recover")

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINING_ARGS_FILE = "training_args.json"


def use_bf16(train: TrainOptions) -> bool:
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


def tokens_per_step(train: TrainOptions, seq_len: int) -> int:
    """Tokens one optimizer step consumes over all processes: the global batch, the same at any number of them."""
    return train.batch_size * train.grad_accum * seq_len


def training_arguments(
    train: TrainOptions, output_dir: Path, seq_len: int, distributed: str = "ddp", model: nn.Module | None = None
) -> TrainingArguments:
    """``TrainingArguments`` of a stage: budget from ``tokens``, ``max_steps`` or ``epochs``; seeded, checkpointed.

    Under torchrun / accelerate launch the global batch ``batch_size * grad_accum`` is split over the processes
    (``surgery.recovery.distributed.split_batch``); ``distributed: fsdp`` adds FSDP2's arguments (``model`` gives
    the decoder-layer class that makes one FSDP unit).
    """
    max_steps = train.max_steps
    if train.tokens is not None:
        max_steps = math.ceil(train.tokens / tokens_per_step(train, seq_len))
    schedule = train.schedule
    if schedule == "constant" and train.warmup_steps:
        schedule = "constant_with_warmup"
    cuda = torch.cuda.is_available()
    world = dist_world_size()
    micro, accum = split_batch(train.batch_size, train.grad_accum, world)
    extra: dict[str, Any] = {}
    if shards(distributed):
        extra = fsdp_arguments(model) if model is not None else fsdp_arguments(nn.Module())
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
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
        **{_CHECKPOINTING_ARG: train.gradient_checkpointing},
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.keep_checkpoints,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        report_to="none",
        remove_unused_columns=False,  # the model's forward is hidden behind peft: keep our two columns
        label_names=["labels"],
        dataloader_num_workers=0,
        **extra,
    )


def mixer_aux_loss(model: nn.Module) -> Tensor | None:
    """Sum of the auxiliary losses mixers set during the last forward (``Mixer.aux_loss``), each cleared once read.

    MoM's load-balancing loss travels this way: the mixer knows its routing, the stage loop only adds.
    """
    total = None
    for module in model.modules():
        aux = getattr(module, "aux_loss", None) if isinstance(module, Mixer) else None
        if aux is not None:
            total = aux if total is None else total + aux
            module.aux_loss = None
    return total


def reset_mixer_stats(model: nn.Module) -> None:
    """Zero every mixer's counters (``Mixer.reset_stats``), e.g. MoM's tokens per memory, as a stage starts."""
    for module in model.modules():
        if isinstance(module, Mixer):
            module.reset_stats()


def mixer_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{"layer <i> <mixer>": stats}`` of every mixer that counts something, summed over processes (collective)."""
    named = {f"layer {m.layer_idx} {m.name}": m.stats() for m in model.modules() if isinstance(m, Mixer)}
    return sum_counts({k: v for k, v in named.items() if v})


# transformers renamed gradient_checkpointing to activation_checkpointing (5.2x); we support both.
_CHECKPOINTING_ARG = next(
    (n for n in ("activation_checkpointing", "gradient_checkpointing") if n in TrainingArguments.__dataclass_fields__),
    "gradient_checkpointing",
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
    for step, path in found:
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.warning("skipping incomplete checkpoint %s", path)
            continue
        # The Trainer resumes at the state's global_step: one that is not the checkpoint's own would skip (or
        # repeat) training and still end "finished".
        stated = state.get("global_step") if isinstance(state, dict) else None
        if type(stated) is not int or stated != step:
            raise DataError(f"{path / 'trainer_state.json'}: global_step is {stated!r}, but the checkpoint is "
                            f"checkpoint-{step}: the checkpoint was altered; restart (surgery recover --restart)")
        return path
    return None


class StageTrainer(Trainer):
    """A Trainer with pickle-free checkpoints that also hold the mixers' own parameters (peft's adapter file does not).

    Per checkpoint, besides the adapter and ``trainer_state.json``: ``optimizer.{json,safetensors}`` (keyed by
    parameter name), ``scheduler.json``, ``scaler.json`` (fp16 only), ``rng_state.{json,safetensors}``
    (``rng_state_<rank>.*`` with several processes) and ``training_args.json``. Single-process, DDP and FSDP2: the
    trainable state is gathered to full tensors and written by rank 0, so a checkpoint does not depend on the
    number of processes (``surgery.recovery.distributed``). DeepSpeed and XLA keep their state in their own
    (pickled) formats and are refused.
    """

    def __init__(self, *args: Any, mixer_params: dict[str, nn.Parameter], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mixer_params = mixer_params
        backend = [n for n, on in (("DeepSpeed", self.is_deepspeed_enabled), ("XLA", is_torch_xla_available())) if on]
        if backend:
            raise ValueError(f"recover: training under {backend[0]} is not supported (its checkpoints are pickled); "
                             "run single-process, or with DDP or FSDP (recover.distributed) under torchrun / "
                             "accelerate launch")  # fmt: skip
        # Names in the peft model (the Trainer's) of the mixers' own parameters, by name: ``fully_shard`` replaces
        # parameter objects, so after an earlier stage sharded the model they are no longer the ones in
        # ``mixer_params`` (peft names are the base model's behind a prefix).
        self.mixer_names = {fqn: name for fqn, _ in self.model.named_parameters()
                            for name in mixer_params if fqn == name or fqn.endswith("." + name)}  # fmt: skip

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # accelerate 1.15 turns FSDP on only for accelerator process groups (its state lists MULTI_GPU, NPU, XPU...),
        # so a CPU run (gloo) that asked for FSDP would silently train under DDP. torch's fully_shard runs on
        # CPU: hand accelerate the plugin the Trainer already built, and its own FSDP2 preparation does the rest.
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    def engine(self) -> str:
        """How this stage trains, for the log: processes, process-group backend, and DDP or FSDP2."""
        world = self.args.world_size
        group = self.accelerator.state.backend if torch.distributed.is_initialized() else None  # "nccl", "gloo"
        how = "FSDP2" if self.is_fsdp_enabled else "DDP" if world > 1 else ""
        return f"{world} process{'es' if world > 1 else ''}" + (f" over {group}" if group else "") + (
            f", {how}" if how else "")

    def trainable_state(self) -> dict[str, Tensor]:
        """Full CPU copies of the LoRA tensors and the mixers' own parameters (peft-model names) on rank 0.

        A collective under FSDP: every process calls it. Frozen adapters (``train: mixer_params``) are included,
        frozen base weights never.
        """
        model = self.model
        keep = [(n, p) for n, p in model.named_parameters() if "lora_" in n or n in self.mixer_names]
        return full_tensors(keep)

    def save_adapter(self, directory: str | Path) -> None:
        """Write the adapter and the mixers' own parameters to ``directory`` (gathered, written by rank 0)."""
        state = self.trainable_state()
        if self.args.should_save:
            self._write_adapter(Path(directory), state)

    def _write_adapter(self, out: Path, state: dict[str, Tensor]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        lora = {n: t for n, t in state.items() if n not in self.mixer_names}
        model.save_pretrained(str(out), state_dict=lora, safe_serialization=True)  # peft: adapter_model.safetensors
        save_mixer_params({self.mixer_names[n]: t for n, t in state.items() if n in self.mixer_names}, out)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, Any]:
        loss, outputs = self.main_loss(model, inputs, num_items_in_batch)
        aux = mixer_aux_loss(model)
        if aux is not None:
            loss = loss + aux
        return (loss, outputs) if return_outputs else loss

    def main_loss(self, model: nn.Module, inputs: dict[str, Tensor], num_items_in_batch: Any) -> tuple[Tensor, Any]:
        """The stage's own loss and the model outputs (next-token cross-entropy here; stages override it)."""
        return super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Before the optimizer step: a non-finite loss or gradient stops the stage with the weights still finite.
        bad = "loss" if not bool(torch.isfinite(loss).all()) else None
        if bad is None:
            grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
            if grads and not bool(torch.isfinite(torch.stack([g.detach().float().norm() for g in grads])).all()):
                bad = "gradient norm"
        if bad is not None:
            step = self.state.global_step + 1
            raise TrainingDiverged(
                f"training diverged at step {step}: the {bad} is not finite (lr {self.args.learning_rate:g}); "
                "lower the stage's lr. The last checkpoint kept is from before this step"
            )
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Replaces the Trainer's, whose FSDP path writes torch.distributed.checkpoint files (pickled metadata) and
        # whose last act is torch.save(self.args, "training_args.bin"). Called on every process: gathers, then
        # rank 0 writes; a checkpoint is only complete (trainer_state.json, written after this) with all of it.
        out = Path(output_dir or self.args.output_dir)
        state = self.trainable_state()
        if not self.args.should_save:
            return
        self._write_adapter(out, state)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(out))
        write_file(out / TRAINING_ARGS_FILE, self.args.to_json_string())

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Every stock path into _save goes through save_model above; this one would write pickles.
        self.save_model(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Full tensors keyed by parameter name (a collective under FSDP); rank 0 writes them.
        state = optimizer_state(self.model, self.optimizer)
        if self.args.should_save:
            save_state(state, output_dir, "optimizer")
            save_state(self.lr_scheduler.state_dict(), output_dir, "scheduler")

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            save_state(scaler.state_dict(), output_dir, "scaler")

    def _save_rng_state(self, output_dir: str) -> None:
        save_state(rng_states(self._distributed()), output_dir, self._rng_name())
        # Every process's file before rank 0 writes trainer_state.json, which marks the checkpoint complete.
        barrier()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # The stage loop loaded the adapter and the mixers' own parameters (full tensors, safetensors only) into the
        # model before this Trainer existed, so FSDP shards them out with the rest; the stock path would hand the
        # adapter to peft, which may torch.load an adapter_model.bin.
        return

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if not (has_state(checkpoint, "optimizer") and has_state(checkpoint, "scheduler")):
            raise ValueError(
                f"{checkpoint} holds no optimizer.json / scheduler.json (a checkpoint of a stock Trainer, whose "
                "pickles surgery does not load?); resume=False starts the stage over"
            )
        # Full tensors on the CPU, on every process: moved to each parameter's device (and shard, under FSDP).
        load_optimizer_state(self.model, self.optimizer, load_state(checkpoint, "optimizer"))
        self.lr_scheduler.load_state_dict(load_state(checkpoint, "scheduler"))

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and has_state(checkpoint, "scaler"):
            scaler.load_state_dict(load_state(checkpoint, "scaler"))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        name = self._rng_name()
        written = len(list(Path(checkpoint).glob("rng_state_*.json"))) or int(has_state(checkpoint, "rng_state"))
        if written != self.args.world_size:
            log.warning("%s was written by %d process(es) and resumes on %d: the data order and the global batch "
                        "continue as they were, the random states (dropout) are not restored exactly",
                        checkpoint, written, self.args.world_size)  # fmt: skip
        if not has_state(checkpoint, name):
            if written == self.args.world_size:
                log.warning("%s holds no %s.json: resume is not exact", checkpoint, name)
            return
        set_rng_states(load_state(checkpoint, name), self._distributed())

    def _rng_name(self) -> str:
        return "rng_state" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}"

    def _distributed(self) -> bool:
        return self.args.parallel_mode == ParallelMode.DISTRIBUTED


def write_loss_curve(history: Sequence[dict[str, Any]], step_tokens: int, directory: Path, title: str) -> None:
    """``loss.csv`` (step, tokens, loss, lr) and ``loss.png`` from the Trainer's log history."""
    rows = [
        (int(e["step"]), int(e["step"]) * step_tokens, float(e["loss"]), float(e.get("learning_rate", float("nan"))))
        for e in history
        if "loss" in e and "step" in e
    ]
    import io

    directory.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["step", "tokens", "loss", "lr"])
    writer.writerows(rows)
    write_file(directory / "loss.csv", buf.getvalue())
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
    with temporary_file(directory / "loss.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
