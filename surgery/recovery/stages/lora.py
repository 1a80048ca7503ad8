"""The ``lora`` stage (Liger's recipe): next-token training of the LoRA adapters on packed text.

Loss ``ce``: next-token cross-entropy on the data. Loss ``distill``: KL divergence from the unconverted model's
next-token distribution (the base model as teacher, run alongside on the same batch; positions whose label is
-100 are not scored, as with cross-entropy).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from surgery.hookspecs import hookimpl
from surgery.recovery.stage import TrainOptions
from surgery.recovery.stage import Stage, StageContext


@functools.cache
def _distill_trainer() -> type:
    """The distillation Trainer, defined on first use (importing the Trainer takes seconds; plans need none)."""
    from surgery.recovery.trainer import StageTrainer

    class DistillTrainer(StageTrainer):
        """KL(teacher || student) of the next-token distributions, mean over scored positions."""

        loss_is_scaled_for_ga = False

        def __init__(self, *args: Any, teacher: nn.Module, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher = teacher.eval().requires_grad_(False)

        def main_loss(self, model: nn.Module, inputs: dict[str, Tensor], num_items_in_batch: Any) -> tuple[Tensor, Any]:
            ids = inputs["input_ids"]
            ref = next(self.teacher.parameters())
            if ref.device != ids.device:
                self.teacher.to(ids.device)  # the Trainer moves the student, not the teacher
            out = model(input_ids=ids, use_cache=False)
            with torch.no_grad():
                target = self.teacher(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            mask = inputs["labels"][:, 1:] != -100  # [B, T-1]: logits at t predict the token at t+1
            student = out.logits[:, :-1].float().log_softmax(-1)
            return F.kl_div(student[mask], target[mask], log_target=True, reduction="batchmean"), out

    return DistillTrainer


class LoraStage(Stage):
    """LoRA fine-tuning on the recovery data: cross-entropy, or distillation from the base model."""

    name = "lora"
    description = "LoRA on the converted layers: next-token cross-entropy (or KL from the base model) on packed text"

    class Options(TrainOptions):
        loss: Literal["ce", "distill"] = Field(
            "ce", description="ce: next-token cross-entropy; distill: KL from the base model's next-token distribution"
        )

    def needs_teacher(self) -> bool:
        return self.options.loss == "distill"

    @contextmanager
    def trainer(self, ctx: StageContext, **kwargs: Any) -> Iterator[Any]:
        if self.options.loss == "distill":
            if ctx.teacher is None:
                raise ValueError("lora with loss: distill needs the unconverted model as teacher")
            yield _distill_trainer()(**kwargs, teacher=ctx.teacher)
        else:
            from surgery.recovery.trainer import StageTrainer

            yield StageTrainer(**kwargs)


@hookimpl
def surgery_stages() -> list[type[Stage]]:
    return [LoraStage]
