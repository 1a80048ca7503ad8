"""The recovery-stage contract: a stage is one class, registered through the ``surgery_stages`` hook.

A stage holds its ``name``, its ``Options`` (the plan's ``recover.stages.<name>`` section: Trainer settings plus
its own), whether it needs the teacher (the unconverted model), and its training step: ``trainer`` returns a
context manager that yields a ``transformers.Trainer`` set up for this stage (loss, hooks, what trains). The stage
loop (``surgery.recovery.loop``) owns everything around it: data, adapters, checkpoints and exact resume, loss
curves, the stage's typed result. Built-in stages live in ``surgery.recovery.stages`` and register exactly like a
plugin's::

    class Distill(Stage):
        name = "distill_hidden"
        description = "match the teacher's last hidden state"
        class Options(TrainOptions):
            weight: float = 1.0
        def needs_teacher(self) -> bool:
            return True
        @contextmanager
        def trainer(self, ctx, **kwargs):
            yield MyTrainer(**kwargs, teacher=ctx.teacher)

The contract is light: this module imports only ``surgery.options`` (the plan parser and the registry read it, and
neither the registry nor the rest of ``surgery.recovery`` is imported here); stages import the Trainer inside
``trainer``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from surgery.errors import TrainingDiverged
from surgery.options import Options

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn
    from transformers import Trainer

__all__ = ["NEUTRAL_TRAIN_KEYS", "Stage", "StageContext", "StageResult", "TrainOptions", "TrainingDiverged"]


class TrainOptions(Options):
    """The Trainer settings of one stage. Budget: ``tokens`` or ``max_steps``, else ``epochs`` over the data.

    Defaults are Liger's recipe (liger.md §4): AdamW lr 1e-3 (weight decay 0.01), constant schedule, grad clip 1.0.
    Batch 2 follows the measured CPU anchor (quality_anchor.md); Liger used a global batch of 8.
    """

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(
        2, ge=1, description="chunks per micro-batch; the global batch (batch_size * grad_accum) is split over processes"
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step in a single process")
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=10**7)
    tokens: int | None = Field(None, ge=1, description="token budget over all processes")
    max_steps: int | None = Field(None, ge=1, le=10**9)
    epochs: float = Field(1.0, gt=0)
    seed: int = 0
    save_steps: int = Field(100, ge=1)
    keep_checkpoints: int | None = Field(2, ge=1, description="None keeps all")
    logging_steps: int = Field(1, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU (a half-precision model is trained in fp32)"
    )
    gradient_checkpointing: bool = False
    recompute_mixers: bool | None = Field(
        None, description="recompute each converted layer's token mixing in the backward instead of keeping its "
                          "activations (less memory than the base model, a few % slower); None: on CUDA only"
    )

    @model_validator(mode="after")
    def _check_budget(self) -> TrainOptions:
        if self.tokens is not None and self.max_steps is not None:
            raise ValueError(f"give tokens ({self.tokens}) or max_steps ({self.max_steps}), not both")
        return self


#: Settings that do not change the trained weights: a resumed run may differ in them.
NEUTRAL_TRAIN_KEYS = frozenset({"save_steps", "keep_checkpoints", "logging_steps", "recompute_mixers"})


@dataclass
class StageContext:
    """What a stage's training step may use.

    Attributes:
        model: the converted model (unwrapped: the peft model's base model), for module paths and hooks.
        peft_model: the model with LoRA adapters, which the Trainer trains.
        mixer_params: the mixers' own trainable parameters by full name (empty when not trained).
        chunks: the packed training data (``surgery.recovery.data.PackedChunks``: ``len`` and ``[i]`` -> ``[T]``
            token ids).
        teacher: the unconverted model (frozen), when ``needs_teacher()``; else None.
    """

    model: nn.Module
    peft_model: PeftModel
    mixer_params: dict[str, Any]
    chunks: Any
    teacher: nn.Module | None = None


@dataclass(frozen=True)
class StageResult:
    """What one stage did: optimizer steps, tokens (all processes), mean of its last 10 losses, wall seconds."""

    steps: int
    tokens: int
    final_loss: float | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class Stage:
    """Base of every recovery stage. Subclasses set ``name``, ``description``, ``Options`` and ``trainer``.

    Attributes:
        before: names of stages this one must precede when both are listed (a located plan error otherwise).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    before: ClassVar[tuple[str, ...]] = ()

    class Options(TrainOptions):
        pass

    def __init__(self, options: TrainOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def needs_teacher(self) -> bool:
        """Whether the stage runs the unconverted model alongside (attention transfer, distillation)."""
        return False

    def trainer(self, ctx: StageContext, **kwargs: Any) -> AbstractContextManager[Trainer]:
        """A context manager yielding this stage's Trainer, built from ``kwargs`` (model, args, data, callbacks,
        ``mixer_params``: the arguments of ``surgery.recovery.trainer.StageTrainer``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"
