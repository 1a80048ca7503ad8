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

This module stays free of heavy imports (the plan parser and the registry load it); stages import the Trainer
inside ``trainer``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.errors import TrainingDiverged
from surgery.recovery.spec import TrainOptions

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn
    from transformers import Trainer

    from surgery.recovery.data import PackedChunks


@dataclass
class StageContext:
    """What a stage's training step may use.

    Attributes:
        model: the converted model (unwrapped: the peft model's base model), for module paths and hooks.
        peft_model: the model with LoRA adapters, which the Trainer trains.
        mixer_params: the mixers' own trainable parameters by full name (empty when not trained).
        chunks: the packed training data.
        teacher: the unconverted model (frozen), when ``needs_teacher()``; else None.
    """

    model: nn.Module
    peft_model: PeftModel
    mixer_params: dict[str, Any]
    chunks: PackedChunks
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
