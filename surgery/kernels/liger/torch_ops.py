"""Liger attention in PyTorch, the CPU path: a banded sliding-window softmax plus the chunked GLA form.

The softmax branch never forms a ``[T, T]`` score matrix and never gathers per-block copies of K and V: queries
go in blocks of ``bs >= window`` rows, so block n needs only the keys of blocks n - 1 and n. Both are *views* of the
same block-reshaped K (``kb[:, n]`` and ``kb[:, n - 1]``), so the scores are ``[T, 2 * bs]`` and the memory linear
in T. The recurrent branch is ``torch_chunk_gla`` (chunked, fp32 accumulation, exponents <= 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from surgery.kernels.gla.torch_ops import torch_chunk_gla

MIN_BLOCK = 32


def check_liger_inputs(q_rope: Tensor, k_rope: Tensor, q_feat: Tensor, k_feat: Tensor, v: Tensor, gk: Tensor,
                       window: int, initial_state: Tensor | None) -> None:
    """Raise ValueError naming the argument whose shape, or the window, is wrong."""
    if q_rope.dim() != 4:
        raise ValueError(f"q_rope must be [B, T, Hq, D], got shape {tuple(q_rope.shape)}")
    B, T, Hq, D = q_rope.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, Hkv, Dv] with [B, T] = {(B, T)}, got shape {tuple(v.shape)}")
    Hkv, Dv = v.shape[2], v.shape[3]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    want = {"k_rope": (B, T, Hkv, D), "q_feat": (B, T, Hq, D), "k_feat": (B, T, Hkv, D), "gk": (B, T, Hkv, D)}
    for name, t in (("k_rope", k_rope), ("q_feat", q_feat), ("k_feat", k_feat), ("gk", gk)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name} must have shape {want[name]}, got {tuple(t.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, Hkv, D, Dv):
        raise ValueError(f"initial_state must have shape {(B, Hkv, D, Dv)}, got {tuple(initial_state.shape)}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")


def banded_sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, softcap: float | None = None
) -> Tensor:
    """Sliding-window causal softmax attention (query t sees keys t - window .. t), O(T * window) work.

    Args:
        q: ``[B, T, Hq, D]`` post-RoPE queries.
        k: ``[B, T, Hkv, D]`` post-RoPE keys; ``Hq % Hkv == 0``.
        v: ``[B, T, Hkv, Dv]``.
        window: previous tokens each query sees besides itself.
        scale: score scale; softcap: ``c`` of ``c * tanh(s / c)`` or None.

    Returns:
        ``[B, T, Hq, Dv]`` fp32 (fp64 for fp64 inputs); differentiable by autograd.
    """
    B, T, Hq, D = q.shape
    Hkv, Dv = v.shape[2], v.shape[3]
    G = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if T == 0:
        return q.new_zeros(B, 0, Hq, Dv, dtype=acc)
    bs = max(1, min(T, max(window, MIN_BLOCK)))
    nb = -(-T // bs)
    pad = nb * bs - T

    def blocks(x: Tensor) -> Tensor:  # [B, T, H, E] -> [B, nb, bs, H, E]; one padded copy at most, no gather
        x = x.to(acc)
        return (F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x).view(B, nb, bs, x.shape[2], x.shape[3])

    qb = blocks(q).view(B, nb, bs, Hkv, G, D)
    kb, vb = blocks(k), blocks(v)
    s_cur = torch.einsum("bnqhgd,bnkhd->bnhgqk", qb, kb) * scale  # keys of the query's own block
    # keys of the previous block: block n's queries against kb[:, n - 1] (views; block 0 has none)
    s_prev = torch.einsum("bnqhgd,bnkhd->bnhgqk", qb[:, 1:], kb[:, :-1]) * scale
    if softcap is not None:
        s_cur = softcap * torch.tanh(s_cur / softcap)
        s_prev = softcap * torch.tanh(s_prev / softcap)
    s_prev = torch.cat([s_cur.new_full((B, 1, *s_cur.shape[2:]), float("-inf")), s_prev], 1)
    r = torch.arange(bs, device=q.device)[:, None]  # local query row
    c = torch.arange(bs, device=q.device)[None, :]  # local key column
    cur_ok = (c <= r) & (r - c <= window)
    prev_ok = bs + r - c <= window
    s = torch.cat([s_prev.masked_fill(~prev_ok, float("-inf")), s_cur.masked_fill(~cur_ok, float("-inf"))], -1)
    p = s.softmax(-1)  # every row sees itself, so no row is all -inf
    o = torch.einsum("bnhgqk,bnkhd->bnqhgd", p[..., bs:], vb)
    if nb > 1:
        o_prev = torch.einsum("bnhgqk,bnkhd->bnqhgd", p[:, 1:, ..., :bs], vb[:, :-1])
        o = o + torch.cat([torch.zeros_like(o[:, :1]), o_prev], 1)
    return o.reshape(B, nb * bs, Hq, Dv)[:, :T]


def torch_liger_attention(
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
    """Liger attention in PyTorch; arguments, shapes and results as ``naive_liger_attention``."""
    swa = banded_sliding_window_attention(q_rope, k_rope, v, window, scale, softcap)
    rec, final = torch_chunk_gla(q_feat, k_feat, v, gk, None, rec_scale, initial_state, output_final_state)
    o = w_swa * swa + w_rec * rec.to(swa.dtype)
    return o.to(v.dtype), final
