"""Recovery on several processes: what ``torchrun`` / ``accelerate launch`` need from us, and nothing more.

The engines are torch's and accelerate's: DDP (accelerate wraps the model when the Trainer prepares it) or FSDP2
(``fully_shard``, configured through the Trainer's ``fsdp`` / ``fsdp_config`` arguments). This module holds the
few decisions they leave to us:

- **The global batch is the plan's.** ``batch_size * grad_accum`` chunks per optimizer step at any number of
  processes: ``split_batch`` divides it into a per-process micro-batch and accumulation steps. A step, a token
  budget and a checkpoint's step number therefore mean the same amount of data at 1, 2 or 8 processes, and a
  run checkpointed by N processes continues on M.
- **Checkpoints are independent of the number of processes.** The trainable state (LoRA tensors, the mixers' own
  parameters, their optimizer state) is gathered to full tensors (``full_tensors``, ``optimizer_state``) and
  written by rank 0 as safetensors + JSON; the optimizer state is keyed by parameter name, not by the position
  of a shard. Resuming reads the full tensors on every rank and lets FSDP shard them out again
  (``load_optimizer_state``). Frozen base weights are never checkpointed: they come from the base model.
- **Only rank 0 writes** reports, plots, adapters and models (``is_main``); the others wait at ``barrier`` where
  they would otherwise read a half-written file.
"""

from __future__ import annotations

import atexit
import copy
import itertools
import logging
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from surgery.outputs import launch

log = logging.getLogger("surgery.recover")


def world_size() -> int:
    """Processes of this run (``WORLD_SIZE`` under torchrun or accelerate launch; 1 otherwise)."""
    return launch()[1]


def rank() -> int:
    """This process's rank (``RANK`` under torchrun or accelerate launch; 0 otherwise)."""
    return launch()[0]


def is_main() -> bool:
    """Whether this process writes (rank 0, or the only process)."""
    return rank() == 0


def init() -> None:
    """Start the process group under torchrun / accelerate launch, once (accelerate picks nccl or gloo), and end it
    when the process exits."""
    if world_size() > 1 and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState()
        # A gloo group still alive when the interpreter finalizes can abort the process after a finished run
        # ("terminate called without an active exception", SIGABRT: pytorch/pytorch#190489), and torchrun then
        # reports the run failed. atexit handlers run while the interpreter is whole.
        atexit.register(_end)


def _end() -> None:
    """Destroy the process group ``init`` started, unless the program already did."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launched() -> bool:
    """Whether torchrun or accelerate launch started this process (they set ``LOCAL_RANK``), at any process count."""
    return "LOCAL_RANK" in os.environ


def shards(distributed: str) -> bool:
    """Whether FSDP2 shards the model in this run: the plan (or ``accelerate launch --use_fsdp``) asks for fsdp, and
    there is a process group to shard over: several processes, or one launched process on a GPU (accelerate starts
    NCCL for it, and a one-GPU run then exercises the same FSDP path as a many-GPU one)."""
    asked = distributed == "fsdp" or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    return asked and (world_size() > 1 or (launched() and torch.cuda.is_available()))


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    if world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def sum_counts(counts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``counts`` (per key, numbers or lists of numbers) added up over every process; the input on one process.

    A collective when distributed (every process calls it, with the same keys): counts travel as objects, which
    works over gloo and NCCL alike and is cheap for what it carries (a few numbers per layer).
    """
    if world_size() == 1 or not torch.distributed.is_initialized():
        return counts
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, counts)

    def add(a: Any, b: Any) -> Any:
        return [add(x, y) for x, y in zip(a, b, strict=True)] if isinstance(a, list) else a + b

    total = copy.deepcopy(gathered[0])
    for other in gathered[1:]:
        total = {k: {n: add(v, other[k][n]) for n, v in stats.items()} for k, stats in total.items()}
    return total


def split_batch(batch_size: int, grad_accum: int, world: int, where: str = "recover.stages") -> tuple[int, int]:
    """Per-process micro-batch and accumulation steps that make the global batch ``batch_size * grad_accum``.

    The micro-batch stays at most ``batch_size`` (memory never grows with the number of processes) and is as large
    as the split allows (the fewest accumulation steps).

    Raises:
        ValueError: the global batch is not a multiple of ``world`` (the message says what to set).
    """
    total = batch_size * grad_accum
    if world <= 1:
        return batch_size, grad_accum
    if total % world:
        raise ValueError(
            f"{where}: the global batch batch_size * grad_accum = {batch_size} * {grad_accum} = {total} chunks cannot "
            f"be split over {world} processes; make it a multiple of {world} (e.g. grad_accum: "
            f"{grad_accum * (world // math.gcd(total, world))})"
        )
    per_process = total // world
    micro = max(m for m in range(1, min(batch_size, per_process) + 1) if per_process % m == 0)
    return micro, per_process // micro


def fsdp_arguments(model: nn.Module) -> dict[str, Any]:
    """The Trainer's ``fsdp`` / ``fsdp_config`` for LoRA under FSDP2 (``fully_shard``).

    One FSDP unit per decoder layer (the model's ``_no_split_modules``), plus the embeddings and the head: FSDP2
    shards every parameter on its own (DTensor), so frozen base weights and trainable adapters may share a unit
    (FSDP1 without ``use_orig_params`` needed them apart). Parameters are resharded after each forward; mixed
    precision is accelerate's policy from ``bf16=True`` (bf16 compute, fp32 master weights of the trainable ones).
    """
    layers = sorted(set(getattr(model, "_no_split_modules", None) or []))
    config: dict[str, Any] = {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}
    if layers and not wrapped(model):  # a later stage: an earlier one sharded it, and accelerate keeps it as it is
        # (naming the layer class then fails: ``fully_shard`` renamed it, e.g. FSDPLlamaDecoderLayer)
        config["auto_wrap_policy"] = "TRANSFORMER_BASED_WRAP"
        config["transformer_layer_cls_to_wrap"] = layers
    return {"fsdp": True, "fsdp_config": config}


def wrapped(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) wraps any module of ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2-sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensors(named: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """Full CPU copies of ``named`` tensors on rank 0 (an empty dict elsewhere).

    A sharded (DTensor) tensor is all-gathered, a collective: every process must call this with the same names in
    the same order.
    """
    from torch.distributed.tensor import DTensor

    out: dict[str, Tensor] = {}
    for name, tensor in named:
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if is_main():
            out[name] = full.detach().to("cpu", copy=True).contiguous()
    return out


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer state with full tensors, keyed by parameter name (rank 0; an empty dict elsewhere).

    The format of ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(full_state_dict=True)``:
    ``{"state": {name: {...}}, "param_groups": [{..., "params": [name, ...]}]}``, for a sharded model (a
    collective) and an unsharded one alike, so a checkpoint written under DDP resumes under FSDP and back.
    """
    optim = _torch_optimizer(optimizer)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if is_main() else {}
    if not is_main():
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    index = [names[id(p)] for group in optim.param_groups for p in group["params"]]
    raw = optim.state_dict()
    return {
        "state": {index[i]: s for i, s in raw["state"].items()},
        "param_groups": [{**g, "params": [index[i] for i in g["params"]]} for g in raw["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load what ``optimizer_state`` wrote (full tensors, on every process): sharded out again under FSDP.

    An optimizer state keyed by position (written before names were used) loads as it is.
    """
    optim = _torch_optimizer(optimizer)
    if all(isinstance(k, int) for k in state.get("state", {})):
        optim.load_state_dict(state)
        return
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optim, state, options=StateDictOptions(full_state_dict=True))
        return
    names = {id(p): n for n, p in model.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(p for g in optim.param_groups for p in g["params"])}
    missing = [n for n in index if n not in state["state"] and any(n in g["params"] for g in state["param_groups"])]
    if missing:
        raise ValueError(f"the optimizer state lacks parameters {missing[:3]}")
    optim.load_state_dict({
        "state": {index[n]: s for n, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    })  # fmt: skip


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules whose parameters live on the meta device (no memory); buffers are copied.

    Taken before FSDP shards ``model`` in place, it is what rank 0 fills with the gathered full weights afterwards
    (``unsharded``): FSDP2 offers no way back from ``fully_shard``.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().clone()
    return copy.deepcopy(model, memo)


def unsharded(model: nn.Module, shell: nn.Module) -> nn.Module | None:
    """On rank 0, ``shell`` (a ``skeleton``) holding the full weights of the sharded ``model``; None elsewhere.

    A collective (every parameter is all-gathered, one at a time, to rank 0's CPU).
    """
    full = full_tensors(itertools.chain(model.named_parameters(), model.named_buffers()))
    if not is_main():
        return None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    shell.load_state_dict(full, strict=False, assign=True)
    tie = getattr(shell, "tie_weights", None)
    if callable(tie):
        tie()  # assign=True replaced the shared parameter on one side of a tied pair
    left = [n for n, p in shell.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"gathering the sharded model left {left[:3]} unfilled")
    for name, param in shell.named_parameters():
        param.requires_grad_(name in trainable)
    return shell
