"""The states of gated linear attention at evenly spaced positions, without its outputs.

``S_t`` (naive.py) after ``first``, ``first + step``, ..., ``first + (count - 1) * step`` tokens: what the retrieval
memory scores its pairs with at each consolidation (surgery.retrieval_batched). On CUDA, when the positions are
chunk starts of the Triton chunk kernel (``step`` = 64 and ``first`` a multiple of 64), one pass of that kernel's
state update and scan gives them all; otherwise (and on the CPU) the PyTorch form advances span by span, each span
one :func:`torch_gla_state` call, which is the arithmetic ``memory_branch`` runs, so the two paths score alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from surgery.kernels.gla.torch_ops import torch_gla_state


def gla_states_at(k: Tensor, v: Tensor, gk: Tensor | None, gv: Tensor | None, first: int, step: int,
                  count: int) -> Tensor:
    """States after ``first + j * step`` tokens for ``j = 0 .. count - 1``, from a zero initial state.

    Args:
        k: ``[B, T, Hkv, K]`` key features; v: ``[B, T, Hkv, V]``; gk, gv: their log decays (<= 0) or None.
        first, step, count: the positions; the last, ``first + (count - 1) * step``, must be ``<= T``.

    Returns:
        ``[B, Hkv, count, K, V]`` fp32.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    last = first + (count - 1) * step
    if count < 1 or first < 0 or step < 1 or last > T:
        raise ValueError(f"gla_states_at: positions {first} + j * {step}, j < {count}, must lie in 0..{T}")
    if k.is_cuda and gk is not None and gv is None:
        out = _triton_states_at(k, v, gk, first, step, count)
        if out is not None:
            return out
    def span(x: Tensor | None, lo: int, hi: int) -> Tensor | None:
        return x[:, lo:hi] if x is not None else None

    S = torch_gla_state(k[:, :first], v[:, :first], span(gk, 0, first), span(gv, 0, first))
    states = [S]
    for j in range(1, count):  # the CPU path: small ops per span, as memory_branch's recurrence runs
        lo, hi = first + (j - 1) * step, first + j * step
        S = torch_gla_state(k[:, lo:hi], v[:, lo:hi], span(gk, lo, hi), span(gv, lo, hi), initial_state=S)
        states.append(S)
    return torch.stack(states, 2).float()


def _triton_states_at(k: Tensor, v: Tensor, gk: Tensor, first: int, step: int, count: int) -> Tensor | None:
    """The positions as chunk starts of one Triton state pass, or None when they are not (or Triton is absent)."""
    try:
        from surgery.kernels.gla import chunk_common as cc
    except Exception:  # noqa: BLE001 - no Triton: the PyTorch form
        return None
    C = cc.CHUNK
    if step != C or first % C:
        return None
    B, T, H, K = k.shape
    n_chunks = -(-T // C)
    cu, table, offsets, N, _ = cc.prepare_chunks(None, B, T, k.device)
    b = cc.chunk_local_cumsum(gk.float().reshape(1, B * T, H, K).contiguous(), table, cu, cc.LOG2E, False,
                              torch.float32)  # fmt: skip
    h, end = cc.chunk_states(k.contiguous(), v.contiguous(), b, None, None, True, 1.0, table, cu, offsets, N, False,
                             torch.float32)  # fmt: skip
    # h: the state before each chunk [B * n_chunks, H, K, V]; end: after the last token [B, H, K, V].
    h = torch.cat([h.view(B, n_chunks, H, K, -1), end[:, None]], 1)
    idx = first // C + torch.arange(count, device=k.device)
    return h[:, idx].transpose(1, 2).float()
