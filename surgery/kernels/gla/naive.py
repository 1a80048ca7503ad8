"""The specification of gated linear attention: an explicit loop over time.

Recurrence (Yang et al., 2024, "Gated Linear Attention Transformers", eq. 3), per key/value head h:

    S_t = diag(exp(gk_t)) @ S_{t-1} @ diag(exp(gv_t)) + k_t^T v_t        S_t: [K, V]
    o_t = scale * q_t @ S_t                                              for every query head of h's group

``gk`` (key-side) and ``gv`` (value-side) are natural-log decays (<= 0). Either may be omitted (no decay on
that side). GQA is native: ``Hq`` query heads share the ``Hkv`` states, query head ``i`` reads state ``i // (Hq // Hkv)``;
k, v and the gates are never repeated.

Variable-length packing follows flash-attention: with ``cu_seqlens`` ([N + 1], int) the batch must be 1 and
segment ``n`` is tokens ``cu_seqlens[n]:cu_seqlens[n+1]`` (empty segments allowed); each segment starts from
``initial_state[n]`` and yields ``final_state[n]``.

This module is slow on purpose and imports only torch. Every faster form must match it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def naive_recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention, one token at a time, accumulated in fp32 (or fp64 if the inputs are fp64).

    Args:
        q: ``[B, T, Hq, K]`` queries.
        k: ``[B, T, Hkv, K]`` keys; ``Hq % Hkv == 0``.
        v: ``[B, T, Hkv, V]`` values.
        gk: ``[B, T, Hkv, K]`` log decay on the key side, or None.
        gv: ``[B, T, Hkv, V]`` log decay on the value side, or None.
        scale: multiplies the output.
        initial_state: ``[N, Hkv, K, V]``; N = B, or the number of segments with ``cu_seqlens``.
        output_final_state: return the state after the last token of each sequence/segment.
        cu_seqlens: ``[N + 1]`` segment boundaries into the time axis (B must be 1).

    Returns:
        ``o`` ``[B, T, Hq, V]`` in v's dtype, and the final state ``[N, Hkv, K, V]`` (fp32/fp64) or None.
    """
    B, T, Hq, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    G = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1, got {B}")
        cs = cu_seqlens.tolist()
        bounds = [(0, cs[n], cs[n + 1]) for n in range(len(cs) - 1)]
    o = torch.zeros(B, T, Hq, V, dtype=acc, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        S = torch.zeros(Hkv, K, V, dtype=acc, device=q.device)
        if initial_state is not None:
            S = S + initial_state[n].to(acc)
        for t in range(start, end):
            if gk is not None:
                S = S * gk[b, t].to(acc).exp()[:, :, None]
            if gv is not None:
                S = S * gv[b, t].to(acc).exp()[:, None, :]
            S = S + k[b, t].to(acc)[:, :, None] * v[b, t].to(acc)[:, None, :]
            # [Hq, K] -> [Hkv, G, K] so each group of query heads reads its one shared state.
            qt = q[b, t].to(acc).view(Hkv, G, K)
            o[b, t] = (scale * torch.einsum("hgk,hkv->hgv", qt, S)).reshape(Hq, V)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return o.to(v.dtype), final
