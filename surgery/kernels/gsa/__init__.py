"""Gated Slot Attention (GSA) as two chained GLA passes, on any GLA backend.

The recurrence is specified by :func:`naive_recurrent_gsa` (``naive.py``). Pass 1 is GLA with keys ``k``, the slot
weights ``s`` as values and ``g`` as a value-side gate: its state is ``Hk [K, M]`` and its output the slot logits
``scale * q @ Hk``. A softmax over the M slots (fp32) gives the reading weights ``p``. Pass 2 is GLA with ``p`` as
queries, ``s`` as keys, ``v`` as values and ``g`` as a key-side gate (scale 1): its state is ``Hv [M, V]``.
Both passes go through the GLA dispatcher, so each uses Triton on GPU when it can.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from surgery.kernels.gla import chunk_gla, fused_recurrent_gla
from surgery.kernels.gsa.naive import naive_recurrent_gsa

__all__ = ["chunk_gsa", "fused_recurrent_gsa", "naive_recurrent_gsa"]

GsaState = tuple[Tensor, Tensor]


def _gsa(
    gla: Callable[..., tuple[Tensor, Tensor | None]],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    g: Tensor,
    scale: float,
    initial_state: GsaState | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    backend: str,
) -> tuple[Tensor, GsaState | None]:
    if s.dim() != 4 or s.shape[:3] != k.shape[:3]:
        raise ValueError(f"s must be [B, T, Hkv, M] with [B, T, Hkv] = {tuple(k.shape[:3])}, got {tuple(s.shape)}")
    if g.shape != s.shape:
        raise ValueError(f"g must have s's shape {tuple(s.shape)}, got {tuple(g.shape)}")
    if initial_state is not None and (not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2):
        raise ValueError("initial_state must be a pair (hk [N, Hkv, K, M], hv [N, Hkv, M, V]) or None")
    hk0, hv0 = initial_state if initial_state is not None else (None, None)
    logits, hk = gla(q, k, s, None, g, scale, hk0, output_final_state, cu_seqlens, backend=backend)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    p = torch.softmax(logits.to(acc), dim=-1).to(q.dtype)  # [B, T, Hq, M]
    o, hv = gla(p, s, v, g, None, 1.0, hv0, output_final_state, cu_seqlens, backend=backend)
    return o, ((hk, hv) if output_final_state else None)


def chunk_gsa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    g: Tensor,
    scale: float = 1.0,
    initial_state: GsaState | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, GsaState | None]:
    """Gated slot attention in chunked form (prefill, training): two :func:`chunk_gla` passes.

    Args:
        q: ``[B, T, Hq, K]`` queries.
        k: ``[B, T, Hkv, K]`` keys; ``Hq % Hkv == 0``.
        v: ``[B, T, Hkv, V]`` values.
        s: ``[B, T, Hkv, M]`` slot write weights.
        g: ``[B, T, Hkv, M]`` log decay per slot (<= 0).
        scale: multiplies the slot logits before the softmax.
        initial_state: ``(hk [N, Hkv, K, M], hv [N, Hkv, M, V])`` or None; N = B, or the number of segments.
        output_final_state: also return the states after each sequence/segment.
        cu_seqlens: ``[N + 1]`` int segment boundaries along T (B must be 1).
        backend: the GLA backend of both passes (``surgery.kernels.gla.BACKENDS``).

    Returns:
        ``o`` ``[B, T, Hq, V]`` in v's dtype, and ``(hk, hv)`` in fp32 (fp64 for fp64 inputs) or None.

    Raises:
        ValueError: a shape, the state pair, ``cu_seqlens`` or ``backend`` is wrong.
    """
    return _gsa(chunk_gla, q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens, backend)


def fused_recurrent_gsa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    g: Tensor,
    scale: float = 1.0,
    initial_state: GsaState | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, GsaState | None]:
    """Gated slot attention token by token (decoding): two :func:`fused_recurrent_gla` passes.

    Same arguments, shapes and results as :func:`chunk_gsa`.
    """
    return _gsa(fused_recurrent_gla, q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens, backend)
