"""Sliding-window causal softmax attention in Triton, forward and backward, GQA-native, with an optional soft cap.

Query t sees the keys t - window .. t. A program takes one block of BM queries of one query head and walks only
the key blocks that intersect its band (at most ``(BM + window) / BN + 1`` of them), with the online softmax of
flash attention (exponents in log2 units, running max subtracted, so every exp2 argument is <= 0). The backward
recomputes the probabilities from the saved log-sum-exp: one kernel for dq (per query block), one for dk and dv
(per key block of one key/value head, looping over the group's query heads, so nothing is accumulated atomically).

Soft cap: ``s -> c * tanh(s / c)``, with tanh written as ``2 * sigmoid(2x) - 1`` (every Triton version has
``tl.sigmoid``); its derivative ``1 - tanh^2`` multiplies the score gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: compiled kernels may read only constexpr globals
# Query rows (BM) and key columns (BN) per tile, warps and pipeline stages; read at every call (tests shrink them).
CONFIG: dict[str, int] = {"bm": 64, "bn": 64, "warps": 4, "stages": 1}


@triton.jit
def _capped(s, softcap, SOFTCAP: tl.constexpr):
    """Scores after the soft cap, and tanh(s / c) (for the backward); without SOFTCAP both are s."""
    if SOFTCAP:
        th = 2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0
        return softcap * th, th
    else:
        return s, s


@triton.jit
def _band(rows, cols, T, window):
    """[BM, BN] bool: query row t sees key s iff s <= t, t - s <= window and both are inside the sequence."""
    return (cols[None, :] <= rows[:, None]) & (rows[:, None] - cols[None, :] <= window) & (rows[:, None] < T)


@triton.jit
def _load_rows(x, base, rows, H, i_h, T, dd, D: tl.constexpr):
    """Rows ``rows`` of head i_h of a contiguous [B, T, H, D] tensor (base = batch offset in tokens) -> [R, BD]."""
    m = (rows[:, None] < T) & (dd[None, :] < D)
    return tl.load(x + ((base + rows[:, None]) * H + i_h) * D + dd[None, :], mask=m, other=0.0)


@triton.jit(do_not_specialize=["T", "window"])
def swa_fwd_kernel(q, k, v, o, lse, res, mix, T, window, scale, softcap, w_swa, Hq: tl.constexpr,
                   Hkv: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, SOFTCAP: tl.constexpr, HAS_RES: tl.constexpr):
    """o and the log2-sum-exp for one block of BM queries of one query head; with HAS_RES also the mix
    ``w_swa * o + res`` (res [B, T, Hq, DV], e.g. the recurrent branch already weighted), summed in fp32."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hq = i_bh // Hq, i_bh % Hq
    i_hk = i_hq // (Hq // Hkv)
    base = i_b.to(tl.int64) * T
    rows = i_m * BM + tl.arange(0, BM)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    q_t = _load_rows(q, base, rows, Hq, i_hq, T, dd, D)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)
    lo = (tl.maximum(i_m * BM - window, 0) // BN) * BN
    hi = tl.minimum(i_m * BM + BM, T)
    for n0 in range(lo, hi, BN):
        cols = n0 + tl.arange(0, BN)
        k_t = _load_rows(k, base, cols, Hkv, i_hk, T, dd, D)
        v_t = _load_rows(v, base, cols, Hkv, i_hk, T, dv, DV)
        s, th = _capped(tl.dot(q_t, tl.trans(k_t)) * scale, softcap, SOFTCAP)
        s = tl.where(_band(rows, cols, T, window), s * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: keep exp2 args at -inf
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_t.dtype), v_t)
        m_i = m_new
    rm = rows < T
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # only rows past T have no key (every real row sees itself)
    out = acc / l_safe[:, None]
    off = ((base + rows[:, None]) * Hq + i_hq) * DV + dv[None, :]
    om = rm[:, None] & (dv[None, :] < DV)
    tl.store(o + off, out.to(o.dtype.element_ty), mask=om)
    if HAS_RES:
        r = tl.load(res + off, mask=om, other=0.0).to(tl.float32)
        tl.store(mix + off, (w_swa * out + r).to(mix.dtype.element_ty), mask=om)
    tl.store(lse + i_bh.to(tl.int64) * T + rows, m_i + tl.log2(l_safe), mask=rm)


@triton.jit
def _probs(q_t, k_t, rows, cols, lse_t, T, window, scale, softcap, SOFTCAP: tl.constexpr):
    """Recomputed probabilities [BM, BN] (0 outside the band) and tanh of the capped scores."""
    s, th = _capped(tl.dot(q_t, tl.trans(k_t)) * scale, softcap, SOFTCAP)
    s = tl.where(_band(rows, cols, T, window), s * LOG2E - lse_t[:, None], float("-inf"))
    return tl.exp2(s), th


@triton.jit(do_not_specialize=["T", "window"])
def swa_bwd_dq_kernel(q, k, v, do, lse, delta, dq, T, window, scale, softcap, w_swa, Hq: tl.constexpr,
                      Hkv: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, SOFTCAP: tl.constexpr, HAS_RES: tl.constexpr):
    """dq for one block of BM queries of one query head: sum over its band of ds @ k * scale; the softmax
    branch's output gradient is w_swa * do (delta already includes w_swa)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hq = i_bh // Hq, i_bh % Hq
    i_hk = i_hq // (Hq // Hkv)
    base = i_b.to(tl.int64) * T
    rows = i_m * BM + tl.arange(0, BM)
    rm = rows < T
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    q_t = _load_rows(q, base, rows, Hq, i_hq, T, dd, D)
    do_t = _load_rows(do, base, rows, Hq, i_hq, T, dv, DV)
    lse_t = tl.load(lse + i_bh.to(tl.int64) * T + rows, mask=rm, other=0.0)
    de_t = tl.load(delta + i_bh.to(tl.int64) * T + rows, mask=rm, other=0.0)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    lo = (tl.maximum(i_m * BM - window, 0) // BN) * BN
    hi = tl.minimum(i_m * BM + BM, T)
    for n0 in range(lo, hi, BN):
        cols = n0 + tl.arange(0, BN)
        k_t = _load_rows(k, base, cols, Hkv, i_hk, T, dd, D)
        v_t = _load_rows(v, base, cols, Hkv, i_hk, T, dv, DV)
        p, th = _probs(q_t, k_t, rows, cols, lse_t, T, window, scale, softcap, SOFTCAP)
        ds = p * (w_swa * tl.dot(do_t, tl.trans(v_t)) - de_t[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        acc += tl.dot(ds.to(k_t.dtype), k_t)
    tl.store(dq + ((base + rows[:, None]) * Hq + i_hq) * D + dd[None, :], (acc * scale).to(dq.dtype.element_ty),
             mask=rm[:, None] & (dd[None, :] < D))


@triton.jit(do_not_specialize=["T", "window"])
def swa_bwd_dkv_kernel(q, k, v, do, lse, delta, dk, dv_out, T, window, scale, softcap, w_swa, Hq: tl.constexpr,
                       Hkv: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, SOFTCAP: tl.constexpr, HAS_RES: tl.constexpr):
    """dk and dv for one block of BN keys of one key/value head, summed over the group's query heads."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // Hkv, i_bh % Hkv
    G: tl.constexpr = Hq // Hkv
    base = i_b.to(tl.int64) * T
    cols = i_n * BN + tl.arange(0, BN)
    dd = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    k_t = _load_rows(k, base, cols, Hkv, i_hk, T, dd, D)
    v_t = _load_rows(v, base, cols, Hkv, i_hk, T, dv, DV)
    acc_k = tl.zeros([BN, BD], dtype=tl.float32)
    acc_v = tl.zeros([BN, BDV], dtype=tl.float32)
    lo = (i_n * BN // BM) * BM
    hi = tl.minimum(i_n * BN + BN + window, T)  # the last query that sees one of these keys, plus one
    for g in range(0, G):
        i_hq = i_hk * G + g
        row0 = (i_b * Hq + i_hq).to(tl.int64) * T
        for m0 in range(lo, hi, BM):
            rows = m0 + tl.arange(0, BM)
            rm = rows < T
            q_t = _load_rows(q, base, rows, Hq, i_hq, T, dd, D)
            do_t = _load_rows(do, base, rows, Hq, i_hq, T, dv, DV)
            lse_t = tl.load(lse + row0 + rows, mask=rm, other=0.0)
            de_t = tl.load(delta + row0 + rows, mask=rm, other=0.0)
            p, th = _probs(q_t, k_t, rows, cols, lse_t, T, window, scale, softcap, SOFTCAP)
            acc_v += tl.dot(tl.trans(p).to(do_t.dtype), do_t)
            ds = p * (w_swa * tl.dot(do_t, tl.trans(v_t)) - de_t[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - th * th)
            acc_k += tl.dot(tl.trans(ds).to(q_t.dtype), q_t)
    cm = cols < T
    tl.store(dk + ((base + cols[:, None]) * Hkv + i_hk) * D + dd[None, :], (acc_k * scale).to(dk.dtype.element_ty),
             mask=cm[:, None] & (dd[None, :] < D))
    tl.store(dv_out + ((base + cols[:, None]) * Hkv + i_hk) * DV + dv[None, :],
             (acc_v * w_swa).to(dv_out.dtype.element_ty), mask=cm[:, None] & (dv[None, :] < DV))


def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


class SlidingWindowAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels: ``w_swa * SWA(q, k, v) + res`` (or SWA alone when res is None).

    Saves q, k, v, the softmax branch's own output and the log2-sum-exp ``[B, Hq, T]`` fp32; the gradient of res is
    the incoming gradient itself (no copy).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, res: Tensor | None, window: int, scale: float,  # noqa: ANN001
                softcap: float | None, w_swa: float) -> Tensor:
        B, T, Hq, D = q.shape
        Hkv, DV = v.shape[2], v.shape[3]
        o = torch.empty(B, T, Hq, DV, device=q.device, dtype=v.dtype)
        mix = torch.empty_like(o) if res is not None else o
        lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
        meta = dict(Hq=Hq, Hkv=Hkv, D=D, DV=DV, BD=_p2(D), BDV=_p2(DV), BM=CONFIG["bm"], BN=CONFIG["bn"],
                    SOFTCAP=softcap is not None, HAS_RES=res is not None, num_warps=CONFIG["warps"],
                    num_stages=CONFIG["stages"])
        cap = float(softcap) if softcap is not None else 1.0
        w = float(w_swa) if res is not None else 1.0
        swa_fwd_kernel[(triton.cdiv(T, CONFIG["bm"]), B * Hq)](q, k, v, o, lse, res if res is not None else o, mix,
                                                               T, window, scale, cap, w, **meta)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (window, scale, cap, w, meta)
        ctx.has_res = res is not None
        return mix

    @staticmethod
    def backward(ctx, do: Tensor):  # noqa: ANN001, ANN205
        q, k, v, o, lse = ctx.saved_tensors
        window, scale, cap, w, meta = ctx.args
        B, T, Hq, _ = q.shape
        Hkv = k.shape[2]
        do = do.contiguous()
        # delta = rowsum(o * d(o)) with d(o) = w * do: the softmax branch's share of the incoming gradient
        delta = ((o.float() * do.float()).sum(-1) * w).transpose(1, 2).contiguous()  # [B, Hq, T]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        swa_bwd_dq_kernel[(triton.cdiv(T, meta["BM"]), B * Hq)](q, k, v, do, lse, delta, dq, T, window, scale, cap,
                                                                w, **meta)
        swa_bwd_dkv_kernel[(triton.cdiv(T, meta["BN"]), B * Hkv)](q, k, v, do, lse, delta, dk, dv, T, window, scale,
                                                                  cap, w, **meta)
        return dq, dk, dv, (do if ctx.has_res else None), None, None, None, None


def sliding_window_attention_triton(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float,
                                    softcap: float | None = None, residual: Tensor | None = None,
                                    w_swa: float = 1.0) -> Tensor:
    """Sliding-window causal softmax attention (query t sees keys t - window .. t), differentiable in q, k, v (and
    ``residual``); with ``residual`` it returns ``w_swa * SWA + residual``, summed in fp32 inside the kernel.

    Args:
        q: ``[B, T, Hq, D]``; k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, Dv]``; one dtype, contiguous or not;
            ``Hq % Hkv == 0``, D and Dv <= 256.
        window: previous tokens each query sees besides itself (>= 0).
        scale: score scale; softcap: ``c`` of ``c * tanh(s / c)`` or None.
        residual: ``[B, T, Hq, Dv]`` added to the weighted output (Liger: the recurrent branch, already weighted).
        w_swa: weight of the softmax branch when ``residual`` is given (ignored otherwise).

    Returns:
        ``[B, T, Hq, Dv]`` in v's dtype.
    """
    q, k, v = (x.contiguous() for x in (q, k, v))
    res = residual.contiguous() if residual is not None else None
    return SlidingWindowAttentionFunction.apply(q, k, v, res, int(window), float(scale), softcap, float(w_swa))
