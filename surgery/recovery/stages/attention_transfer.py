"""The ``attention_transfer`` stage (LoLCATs stage 1): each converted layer learns the attention it replaced.

Loss: the sum over converted layers of ``mse(mixer(x), attention(x))`` on the same inputs, teacher-forced (every
layer sees the original model's hidden states), so the layers train jointly in one forward pass yet independently.
It trains the LoRA adapters and the mixers' own parameters (``train: adapters``), or the latter only
(``train: mixer_params``). It must come before ``lora``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from surgery.hookspecs import hookimpl
from surgery.mixer import Mixer
from surgery.recovery.distributed import wrapped
from surgery.recovery.stage import TrainOptions
from surgery.recovery.stage import Stage, StageContext


class AttentionTransfer:
    """Per-layer MSE between each converted layer and the attention it replaced, on the same inputs (LoLCATs).

    While active, a forward hook on every mixer runs the original attention module (the teacher, frozen) on the
    mixer's own call arguments, records ``mse(mixer(x), teacher(x))`` and hands the *teacher's* output on. Every
    layer therefore sees exactly the hidden states of the original model (teacher forcing), the layers train
    jointly in one forward pass yet independently, and gradients never cross layers.

    The summed loss leaves the forward as the model output's ``loss`` (set by a hook on ``top``, the module the
    Trainer wraps): DDP with ``find_unused_parameters`` looks for the trainable parameters in the graph of the
    forward's *output*, and the logits, computed from the teacher's hidden states, reach none of them. A loss
    gathered outside the output made DDP mark every adapter unused at the end of the forward, then ready a second
    time in the backward ("marked as ready twice").

    Under FSDP2 the backward must also pass through every layer's output: FSDP2 gathers a layer's sharded
    parameters for the backward in a hook on that output, and reduces their gradients in one on its input. Teacher
    forcing leaves both out of the loss's graph, so there each handed-on output is ``teacher + 0 * mixer`` and the
    loss gains ``0 * logits``: the same values and gradients, with a (zero) path through every layer.
    """

    def __init__(self, pairs: Sequence[tuple[str, Mixer, nn.Module]], top: nn.Module | None = None) -> None:
        self.pairs = list(pairs)
        self.top = top
        self.losses: list[Tensor] = []
        self._handles: list[Any] = []
        self.through_layers = False  # set per forward: the model is sharded by FSDP2

    def __enter__(self) -> AttentionTransfer:
        for _, mixer, teacher in self.pairs:
            teacher.requires_grad_(False)
            teacher.eval()
            self._handles.append(mixer.register_forward_hook(self._hook(teacher), with_kwargs=True))
        if self.top is not None:
            self._handles.append(self.top.register_forward_hook(self._attach))
        return self

    def _attach(self, _module: nn.Module, _args: tuple, output: Any) -> Any:
        if self.losses and isinstance(output, dict):
            # ``loss``: a field the output already has (None without labels); DDP rebuilds the output by its fields.
            loss = torch.stack(self.losses).sum()
            if self.through_layers and output.get("logits") is not None:
                loss = loss + 0 * output["logits"].float().sum()
            output["loss"] = loss
        return output

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
            if self.through_layers:
                return (target + 0 * output[0], *output[1:])
            return (target, *output[1:])

        return hook

    def loss(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """Sum over converted layers of the mean squared error on ``input_ids`` ``[B, T]``."""
        self.losses.clear()
        self.through_layers = wrapped(model)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if _accepts(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1  # the logits are unused: skip most of the LM head
        output = model(**kwargs)
        if len(self.losses) != len(self.pairs):
            raise RuntimeError(f"attention transfer: {len(self.losses)} of {len(self.pairs)} converted layers ran")
        attached = output.get("loss") if isinstance(output, dict) and self.top is not None else None
        out = attached if attached is not None else torch.stack(self.losses).sum()
        self.losses.clear()
        return out


def _accepts(model: nn.Module, name: str) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(inner.forward).parameters


def teacher_pairs(model: nn.Module, teacher_model: nn.Module) -> list[tuple[str, Mixer, nn.Module]]:
    """(path, mixer, original attention) for every converted layer, the originals taken from the base model."""
    from surgery.recovery.adapters import find_mixers

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


@functools.cache
def _transfer_trainer() -> type:
    """The Trainer of this stage, defined on first use (importing the Trainer takes seconds; plans need none)."""
    from surgery.recovery.trainer import StageTrainer

    class TransferTrainer(StageTrainer):
        """The loss is ``AttentionTransfer.loss``, a per-batch mean (scaled for gradient accumulation here)."""

        loss_is_scaled_for_ga = False

        def __init__(self, *args: Any, transfer: AttentionTransfer, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.transfer = transfer

        def main_loss(self, model: nn.Module, inputs: dict[str, Tensor], num_items_in_batch: Any) -> tuple[Tensor, Any]:
            return self.transfer.loss(model, inputs["input_ids"]), None

    return TransferTrainer


class AttentionTransferStage(Stage):
    """Per-layer output matching against the original attention (MSE), before LoRA."""

    name = "attention_transfer"
    description = "each converted layer learns the original attention's output on the same input (MSE, LoLCATs)"
    before = ("lora",)

    class Options(TrainOptions):
        train: Literal["adapters", "mixer_params"] = Field(
            "adapters", description="adapters: LoRA adapters and the mixers' own parameters; mixer_params: the latter"
        )
        # Measured on SmolLM2 + Liger-GLA with LoRA alpha/r = 1 (docs/benchmarks.md): after 18 steps, held-out
        # perplexity 1.45x base from 5e-3, 1.39x from 1e-2, 1.36x from 2e-2. With alpha/r = 2 5e-3 to 7e-3 is
        # best and 2e-2 is unstable, so 1e-2 is the default.
        lr: float = Field(1e-2, gt=0)

    def needs_teacher(self) -> bool:
        return True

    @contextmanager
    def trainer(self, ctx: StageContext, **kwargs: Any) -> Iterator[Any]:
        if ctx.teacher is None:
            raise ValueError("attention_transfer needs the unconverted model as teacher")
        pairs = teacher_pairs(ctx.model, ctx.teacher)
        adapters = [p for n, p in ctx.peft_model.named_parameters() if "lora_" in n]
        if self.options.train == "mixer_params":
            if not ctx.mixer_params:
                raise ValueError("recover.stages.attention_transfer.train is mixer_params, but the mixers have no "
                                 "parameters of their own")  # fmt: skip
            for p in adapters:
                p.requires_grad_(False)
        try:
            with AttentionTransfer(pairs, top=ctx.peft_model) as transfer:
                yield _transfer_trainer()(**kwargs, transfer=transfer)
        finally:
            for p in adapters:
                p.requires_grad_(True)


@hookimpl
def surgery_stages() -> list[type[Stage]]:
    return [AttentionTransferStage]
