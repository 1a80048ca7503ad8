"""The specification of the fused Liger attention op: explicit masks and a token loop.

Liger attention (arXiv 2503.01496) mixes two branches that read the same values::

    o = w_swa * SWA(q_rope, k_rope, v) + w_rec * GLA(q_feat, k_feat, v, gk)

SWA is softmax attention restricted to a sliding window: the query at position t sees the keys t - window .. t
(``window`` previous tokens and itself), with the layer's ``scale`` and an optional soft cap
``softcap * tanh(s / softcap)`` on the scores. GLA is gated linear attention with key-side log gates ``gk`` (<= 0),
one state per key/value head (``naive_recurrent_gla``), scaled by ``rec_scale``. Both branches are GQA-native:
query head i reads key/value head ``i // (Hq // Hkv)``.

This module is slow on purpose (a ``[T, T]`` score matrix and the GLA token loop); every faster form must match it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from surgery.kernels.gla.naive import naive_recurrent_gla


def naive_sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, softcap: float | None = None
) -> Tensor:
    """Sliding-window causal softmax attention with an explicit ``[T, T]`` mask, in fp32 (fp64 for fp64 inputs).

    Args:
        q: ``[B, T, Hq, D]`` post-RoPE queries.
        k: ``[B, T, Hkv, D]`` post-RoPE keys; ``Hq % Hkv == 0``.
        v: ``[B, T, Hkv, Dv]``.
        window: previous tokens each query sees besides itself (>= 0).
        scale: multiplies the scores before the soft cap and the softmax.
        softcap: the cap ``c`` of ``c * tanh(s / c)``, or None.

    Returns:
        ``[B, T, Hq, Dv]`` in the accumulation dtype.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).view(B, T, Hkv, Hq // Hkv, D)
    s = torch.einsum("bthgd,bshd->bhgts", qg, k.to(acc)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    t = torch.arange(T, device=q.device)
    seen = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] <= window)  # [T(query), T(key)]
    p = s.masked_fill(~seen, float("-inf")).softmax(-1)
    o = torch.einsum("bhgts,bshd->bthgd", p, v.to(acc))
    return o.reshape(B, T, Hq, v.shape[-1])


def naive_liger_attention(
    q_rope: Tensor,
    k_rope: Tensor,
    q_feat: Tensor,
    k_feat: Tensor,
    v: Tensor,
    gk: Tensor,
    *,
    window: int,
    scale: float,
    softcap: float | None = None,
    w_swa: float = 0.5,
    w_rec: float = 0.5,
    rec_scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Liger attention, the specification (see the module docstring).

    Args:
        q_rope: ``[B, T, Hq, D]`` post-RoPE queries of the softmax branch.
        k_rope: ``[B, T, Hkv, D]`` post-RoPE keys of the softmax branch.
        q_feat: ``[B, T, Hq, D]`` feature-mapped queries of the recurrent branch.
        k_feat: ``[B, T, Hkv, D]`` feature-mapped keys of the recurrent branch.
        v: ``[B, T, Hkv, Dv]`` values, shared by both branches.
        gk: ``[B, T, Hkv, D]`` key-side log decays (<= 0) of the recurrent branch.
        window, scale, softcap: the softmax branch (``naive_sliding_window_attention``).
        w_swa, w_rec: the weights of the two branches.
        rec_scale: multiplies the recurrent branch's output (Liger uses 1).
        initial_state: ``[B, Hkv, D, Dv]`` recurrent state before the first token, or None (zeros).
        output_final_state: also return the recurrent state after the last token.

    Returns:
        ``o`` ``[B, T, Hq, Dv]`` in v's dtype, and the final state ``[B, Hkv, D, Dv]`` (fp32, fp64 for fp64
        inputs) or None.
    """
    swa = naive_sliding_window_attention(q_rope, k_rope, v, window, scale, softcap)
    rec, final = naive_recurrent_gla(q_feat, k_feat, v, gk, None, rec_scale, initial_state, output_final_state)
    o = w_swa * swa + w_rec * rec.to(swa.dtype)
    return o.to(v.dtype), final
