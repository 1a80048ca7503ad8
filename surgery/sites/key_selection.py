"""Key selection by a learned indexer (DeepSeek Sparse Attention, DSA): each query attends only to the top-k keys
that the layer's own "lightning indexer" scores highest.

DeepSeek-V3.2, GLM-MoE-DSA, AXK2, HY-V4 and Dots3 add to their latent attention a child ``indexer`` with weights of
its own (``wq_b``, ``wk``, ``k_norm``, ``weights_proj``). Called as
``indexer(hidden_states, q_resid, position_embeddings, mask [B, T, S], position_ids, cache=cache)`` it returns the
indices ``[B, T, k]`` of the keys each query may see (``q_resid`` is the normalised query latent, see
``surgery.sites.latent``); it keeps its own single-head keys in the cache (``cache.update_indexer``). Layers whose
attention takes ``prev_topk_indices`` also return their selection as a third output, and their "shared" layers
(``indexer = None``) reuse the previous layer's instead of running one.

What a mixer does with it is the mixer's choice (``Mixer.uses_key_selection``): the ``softmax`` mixer runs a deep
copy of the model's own indexer, under its own name, and masks the unselected keys, so a kept layer is exact and
decodes as the pretrained one does; recurrent mixers attend to every key by construction and do not own it, so its
tensors are reported dropped.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: Child names of the indexer module, and the leading parameters its ``forward`` must take.
INDEXERS = ("indexer",)
_CALL = ("hidden_states", "q_resid", "position_embeddings", "attention_mask")
#: The keyword through which the layer receives the previous layer's selection (and then returns its own).
PREVIOUS = "prev_topk_indices"


@dataclass(frozen=True)
class KeySelection:
    """How one attention module selects keys (no tensors; valid on the meta device).

    ``name`` is the indexer's child name, "" on a layer that reuses the previous layer's selection (``shared``);
    ``passes_on``: the module takes the previous layer's selection as ``prev_topk_indices`` and returns its own
    as a third output, which the decoder layer hands to the next layer.
    """

    name: str
    passes_on: bool
    module: nn.Module | None = field(default=None, compare=False, repr=False)
    rope_dim: int = 0  # width of the indexer's rotary part (what its cos/sin cover)

    @property
    def shared(self) -> bool:
        """Whether the layer runs no indexer of its own and reuses the previous layer's selection."""
        return self.module is None


def _forward_params(module: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # no introspectable signature
        return []


def read_key_selection(module: nn.Module, rope_dim: int, error: Callable[[str], Exception]) -> KeySelection | None:
    """The key selection of ``module`` (None when it selects none).

    Args:
        rope_dim: the latent rotary width, which the indexer's position embeddings cover.
        error: builds the exception for an indexer that is recognised but cannot be called as described.
    """
    passes_on = PREVIOUS in _forward_params(module)
    children = dict(module.named_children())
    for name in INDEXERS:
        indexer = children.get(name)
        if indexer is None:
            continue
        params = _forward_params(indexer)
        if tuple(params[: len(_CALL)]) != _CALL or "cache" not in params:
            raise error(f"key selection {name!r} ({type(indexer).__name__}) takes ({', '.join(params)}); readable: "
                        f"({', '.join(_CALL)}, ..., cache)")  # fmt: skip
        return KeySelection(name, passes_on, indexer, rope_dim)
    # A shared DSA layer declares ``indexer = None`` and takes the previous layer's selection.
    if passes_on and any(hasattr(module, n) and getattr(module, n) is None for n in INDEXERS):
        return KeySelection("", True, None, rope_dim)
    return None


def key_selection_weights(module: nn.Module, selection: KeySelection | None) -> dict[str, Tensor]:
    """The indexer's tensors under the module's own names (``indexer.wq_b.weight``...); empty when there is none."""
    if selection is None or selection.module is None:
        return {}
    return {f"{selection.name}.{n}": p.detach() for n, p in selection.module.named_parameters()}


def _causal(T: int, S: int, like: Tensor) -> Tensor:
    """``[1, T, S]`` bool, True where query t (the last T of S positions) may see key s."""
    behind = torch.arange(S - T, S, device=like.device)[:, None] - torch.arange(S, device=like.device)[None, :]
    return (behind >= 0)[None]


def select_keys(
    indexer: nn.Module, selection: KeySelection, x: Tensor, q_latent: Tensor | None, position_embeddings: Any,
    attention_mask: Any, cache: Any, num_keys: int,
) -> Tensor:
    """The keys each query may see: int indices ``[B, T, k]`` into the ``num_keys`` keys of this call.

    Args:
        indexer: the mixer's copy of the model's indexer.
        x: the layer input ``[B, T, C]``; q_latent: the normalised query latent ``[B, T, q_rank]``.
        position_embeddings: what the decoder layer passed; None (a probe) rotates nothing.
        attention_mask: the layer's 4D mask ``[B, 1, T, S]`` (the DSA families always build one), or None (a
            probe): plain causal.
        cache: the forward's cache; the indexer appends its keys to this layer's slot.
    """
    if q_latent is None:
        raise ValueError("key selection needs the normalised query latent (q_a_proj/q_a_layernorm)")
    B, T, _ = x.shape
    if position_embeddings is None:
        # No positions: the identity rotation, as Rotary.apply rotates nothing then.
        ones = x.new_ones(B, T, selection.rope_dim)
        position_embeddings = (ones, torch.zeros_like(ones))
    mask = attention_mask[:, 0] if isinstance(attention_mask, Tensor) else _causal(T, num_keys, x).expand(B, -1, -1)
    return indexer(x, q_latent, position_embeddings, mask, None, cache=cache)


def selection_mask(indices: Tensor, attention_mask: Any, num_keys: int, dtype: torch.dtype) -> Tensor:
    """``attention_mask`` with the keys ``indices`` ``[B, T, k]`` does not select masked too, as the DSA layers do.

    A boolean mask (True = attend) is and-ed, an additive one filled with ``finfo(dtype).min``; None (a probe) gives
    a causal boolean one. Returns ``[B, 1, T, S]``.
    """
    B, T, _ = indices.shape
    masked = indices.new_ones((B, T, num_keys), dtype=torch.bool).scatter(-1, indices.long(), False).unsqueeze(1)
    if attention_mask is None:
        return _causal(T, num_keys, indices)[:, None] & ~masked
    if attention_mask.dtype == torch.bool:
        return attention_mask & ~masked
    return attention_mask.masked_fill(masked, torch.finfo(dtype).min)
