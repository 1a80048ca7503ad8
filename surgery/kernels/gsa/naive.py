"""The specification of Gated Slot Attention (Zhang et al., 2024, "Gated Slot Attention"): a loop over time.

GSA keeps M memory slots per key/value head h, each with a log decay ``g_t[m]`` (<= 0) and a write weight
``s_t[m]``. Two states, both decayed per slot:

    Hk_t = Hk_{t-1} @ diag(e^{g_t}) + k_t^T s_t          Hk: [K, M]   (slot keys)
    Hv_t = diag(e^{g_t}) @ Hv_{t-1} + s_t^T v_t          Hv: [M, V]   (slot values)
    p_t  = softmax_M(scale * q_t @ Hk_t)                  reading weights over the slots, in fp32
    o_t  = p_t @ Hv_t

GQA as in GLA: query head i reads the states of key/value head ``i // (Hq // Hkv)``. ``cu_seqlens`` packing
follows ``naive_recurrent_gla``. Each half is a GLA recurrence (the slot axis plays the value axis of the first
and the key axis of the second), which is how the fast forms compute it; this loop is written out on its own so
that it checks them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def naive_recurrent_gsa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    g: Tensor,
    scale: float = 1.0,
    initial_state: tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Gated slot attention, one token at a time, accumulated in fp32 (fp64 if the inputs are fp64).

    Args:
        q: ``[B, T, Hq, K]`` queries.
        k: ``[B, T, Hkv, K]`` keys; ``Hq % Hkv == 0``.
        v: ``[B, T, Hkv, V]`` values.
        s: ``[B, T, Hkv, M]`` slot write weights.
        g: ``[B, T, Hkv, M]`` log decay per slot (<= 0).
        scale: multiplies the slot logits ``q @ Hk`` before the softmax.
        initial_state: ``(hk [N, Hkv, K, M], hv [N, Hkv, M, V])``; N = B, or the number of segments.
        output_final_state: return the states after the last token of each sequence/segment.
        cu_seqlens: ``[N + 1]`` segment boundaries into the time axis (B must be 1).

    Returns:
        ``o`` ``[B, T, Hq, V]`` in v's dtype, and ``(hk, hv)`` (fp32/fp64) or None.
    """
    B, T, Hq, K = q.shape
    Hkv, V, M = v.shape[2], v.shape[3], s.shape[3]
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
    finals_k, finals_v = [], []
    for n, (b, start, end) in enumerate(bounds):
        hk = torch.zeros(Hkv, K, M, dtype=acc, device=q.device)
        hv = torch.zeros(Hkv, M, V, dtype=acc, device=q.device)
        if initial_state is not None:
            hk = hk + initial_state[0][n].to(acc)
            hv = hv + initial_state[1][n].to(acc)
        for t in range(start, end):
            decay = g[b, t].to(acc).exp()  # [Hkv, M]
            st = s[b, t].to(acc)
            hk = hk * decay[:, None, :] + k[b, t].to(acc)[:, :, None] * st[:, None, :]
            hv = hv * decay[:, :, None] + st[:, :, None] * v[b, t].to(acc)[:, None, :]
            qt = q[b, t].to(acc).reshape(Hkv, G, K)
            p = torch.softmax(scale * torch.einsum("hgk,hkm->hgm", qt, hk), dim=-1)
            o[b, t] = torch.einsum("hgm,hmv->hgv", p, hv).reshape(Hq, V)
        finals_k.append(hk)
        finals_v.append(hv)
    final = (torch.stack(finals_k), torch.stack(finals_v)) if output_final_state else None
    return o.to(v.dtype), final
