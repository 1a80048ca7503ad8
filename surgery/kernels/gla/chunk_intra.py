"""Intra-chunk building blocks of the chunked GLA kernels (Triton device functions), and the chunk classifier.

Sub-chunk path: rows go in sub-chunks of BC tokens with the reference at the sub-chunk's first row (``_tiles``,
``_scores``), the diagonal block exact and elementwise when its span is too wide (``_diag_scores``,
``_diag_grads``). One-reference path: the whole chunk in one frame (``_chunk_frame``, ``_frame_keys``,
``_frame_rows``). ``work_list`` lists, on the device, the (chunk, kv-head) pairs that need the sub-chunk path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from surgery.kernels.gla import chunk_common as cc
from surgery.kernels.gla.chunk_common import CHUNK, _chunk_bounds, p2, sm_count


@triton.jit
def _rows(s, L, G: tl.constexpr, GP: tl.constexpr, BC: tl.constexpr):
    """Row r of sub-chunk s is chunk-local time s*BC + r // GP and group head r % GP: (t, g, valid)."""
    r = tl.arange(0, BC * GP)
    t = s * BC + r // GP
    g = r % GP
    return t, g, (t < L) & (g < G)


@triton.jit
def _diag_limit(bb, s, L, sk, K: tl.constexpr, BC: tl.constexpr, BKF: tl.constexpr, SPAN_MAX: tl.constexpr):
    """(slow, lim): does sub-chunk s's diagonal block need the elementwise path; last key row the product covers."""
    kk = tl.arange(0, BKF)
    last = tl.minimum(s * BC + BC, L) - 1
    ref = tl.load(bb + (s * BC) * sk + kk, mask=kk < K, other=0.0)
    end = tl.load(bb + last * sk + kk, mask=kk < K, other=0.0)
    slow = tl.max(ref - end, axis=0) > SPAN_MAX
    return slow, tl.where(slow, s * BC - 1, last)


@triton.jit
def _tiles(qb, kb, bb, t, g, rmask, row0, L, lim, k0, sq, sk, K: tl.constexpr, C: tl.constexpr,
           BKI: tl.constexpr):
    """One K-block of a row sub-chunk starting at row0, scaled to the reference ref = b[row0].

    Returns q [RS, BKI] fp32, b [RS, BKI], f_q = 2^(b - ref) (<= 1), e = 2^(ref - b_j) on the keys j <= lim
    (<= 1 before row0, <= 2^SPAN_MAX inside the sub-chunk), 0 elsewhere [C, BKI], and k * e.
    """
    kk = k0 + tl.arange(0, BKI)
    km = kk < K
    j = tl.arange(0, C)
    qm = rmask[:, None] & km[None, :]
    q_s = tl.load(qb + t[:, None] * sq + g[:, None] * K + kk[None, :], mask=qm, other=0.0).to(tl.float32)
    b_s = tl.load(bb + t[:, None] * sk + kk[None, :], mask=qm, other=0.0)
    ref = tl.load(bb + row0 * sk + kk, mask=km, other=0.0)
    jm = (j[:, None] < L) & km[None, :]
    k_c = tl.load(kb + j[:, None] * sk + kk[None, :], mask=jm, other=0.0).to(tl.float32)
    b_c = tl.load(bb + j[:, None] * sk + kk[None, :], mask=jm, other=0.0)
    e = tl.exp2(tl.where(j[:, None] <= lim, ref[None, :] - b_c, float("-inf")))
    f_q = tl.exp2(tl.where(qm, b_s - ref[None, :], 0.0))
    return q_s, b_s, f_q, e, k_c * e


@triton.jit
def _scores(qb, kb, bb, t, g, rmask, s, L, lim, sq, sk, K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
            BKI: tl.constexpr, RS: tl.constexpr):
    """Causal intra-chunk scores of row sub-chunk s against the chunk's keys, [RS, C], by the factorised product."""
    A = tl.zeros([RS, C], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BKI):
        q_s, b_s, f_q, e, k_hat = _tiles(qb, kb, bb, t, g, rmask, s * BC, L, lim, k0, sq, sk, K, C, BKI)
        A += tl.dot(q_s * f_q, tl.trans(k_hat))
    j = tl.arange(0, C)
    return tl.where(j[None, :] <= t[:, None], A, 0.0)


@triton.jit
def _diag_scores(A, qb, kb, bb, t, g, rmask, s, L, sq, sk, K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                 BKI: tl.constexpr, RS: tl.constexpr):
    """Add the exact diagonal block of sub-chunk s to the scores A [RS, C]; every exponent is <= 0."""
    j = tl.arange(0, C)
    for jj in range(0, BC):
        jc = s * BC + jj
        col = tl.zeros([RS], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BKI):
            kk = k0 + tl.arange(0, BKI)
            km = kk < K
            qm = rmask[:, None] & km[None, :]
            q_s = tl.load(qb + t[:, None] * sq + g[:, None] * K + kk[None, :], mask=qm, other=0.0).to(tl.float32)
            b_s = tl.load(bb + t[:, None] * sk + kk[None, :], mask=qm, other=0.0)
            k_j = tl.load(kb + jc * sk + kk, mask=km & (jc < L), other=0.0).to(tl.float32)
            b_j = tl.load(bb + jc * sk + kk, mask=km & (jc < L), other=0.0)
            w = tl.exp2(tl.where(qm & (t[:, None] >= jc), b_s - b_j[None, :], float("-inf")))
            col += tl.sum(q_s * k_j[None, :] * w, axis=1)
        A += tl.where(j[None, :] == jc, col[:, None], 0.0)
    return A


@triton.jit
def _diag_grads(dq, dk, dA, q_s, b_s, t, rmask, kb, bb, kk, s, L, sk, K: tl.constexpr, C: tl.constexpr,
                BC: tl.constexpr):
    """Add the exact diagonal block's share of dq [RS, BK] and dk [C, BK] (one K-block), given dA [RS, C]."""
    km = kk < K
    j = tl.arange(0, C)
    for jj in range(0, BC):
        jc = s * BC + jj
        k_j = tl.load(kb + jc * sk + kk, mask=km & (jc < L), other=0.0).to(tl.float32)
        b_j = tl.load(bb + jc * sk + kk, mask=km & (jc < L), other=0.0)
        w = tl.exp2(tl.where(rmask[:, None] & km[None, :] & (t[:, None] >= jc), b_s - b_j[None, :],
                             float("-inf")))
        da = tl.sum(tl.where(j[None, :] == jc, dA, 0.0), axis=1)
        dq += da[:, None] * k_j[None, :] * w
        dk_j = tl.sum(da[:, None] * q_s * w, axis=0)
        dk += tl.where(j[:, None] == jc, dk_j[None, :], 0.0)
    return dq, dk


@triton.jit
def _chunk_frame(bb, L, sk, K: tl.constexpr, BKF: tl.constexpr, FAST_SPAN: tl.constexpr):
    """Whether the whole chunk can use one reference: its decay span (log2, over every key dim) <= FAST_SPAN."""
    kk = tl.arange(0, BKF)
    first = tl.load(bb + kk, mask=(kk < K) & (L > 0), other=0.0)
    last = tl.load(bb + (L - 1) * sk + kk, mask=(kk < K) & (L > 0), other=0.0)
    return (tl.max(first - last, axis=0) <= FAST_SPAN) & (L > 0)


@triton.jit
def _frame_keys(kb, bb, L, kk, sk, K: tl.constexpr, C: tl.constexpr):
    """The chunk's keys in the one-reference frame: m = mid-range decay, k_hat = k * 2^(m - b) [C, BK] (fp32),
    plus k and b themselves. |m - b| <= span / 2 <= FAST_SPAN / 2, so nothing over- or underflows."""
    j = tl.arange(0, C)
    km = kk < K
    jk = (j[:, None] < L) & km[None, :]
    first = tl.load(bb + kk, mask=km & (L > 0), other=0.0)
    last = tl.load(bb + (L - 1) * sk + kk, mask=km & (L > 0), other=0.0)
    m = (first + last) * 0.5
    k_c = tl.load(kb + j[:, None] * sk + kk[None, :], mask=jk, other=0.0).to(tl.float32)
    b_c = tl.load(bb + j[:, None] * sk + kk[None, :], mask=jk, other=0.0)
    k_hat = k_c * tl.exp2(tl.where(jk, m[None, :] - b_c, 0.0))
    return m, last, k_c, b_c, k_hat


@triton.jit
def _frame_rows(qb, bb, s, L, m, kk, sq, sk, K: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                RB: tl.constexpr):
    """Row block s (RB times x GP heads): t, g, valid, q (fp32), b, and q_hat = q * 2^(b - m)."""
    r = tl.arange(0, RB * GP)
    t = s * RB + r // GP
    g = r % GP
    rmask = (t < L) & (g < G)
    qm = rmask[:, None] & (kk[None, :] < K)
    q_s = tl.load(qb + t[:, None] * sq + g[:, None] * K + kk[None, :], mask=qm, other=0.0).to(tl.float32)
    b_s = tl.load(bb + t[:, None] * sk + kk[None, :], mask=qm, other=0.0)
    f_q = tl.exp2(tl.where(qm, b_s - m[None, :], 0.0))
    return t, g, rmask, q_s, b_s, f_q


@triton.jit
def _frames(b, bv, t0, i_h, L, Hkv, K: tl.constexpr, V: tl.constexpr, BKF: tl.constexpr, BVF: tl.constexpr,
            FAST_SPAN: tl.constexpr, HAS_GV: tl.constexpr):
    """Whether the chunk takes the one-reference path: the key-side span, and with HAS_GV the value-side one too,
    within FAST_SPAN. The one-reference kernels and the classifier must use this same test."""
    ok = _chunk_frame(b + (t0 * Hkv + i_h) * K, L, Hkv * K, K, BKF, FAST_SPAN)
    if HAS_GV:
        ok = ok & _chunk_frame(bv + (t0 * Hkv + i_h) * V, L, Hkv * V, V, BVF, FAST_SPAN)
    return ok


@triton.jit
def _frame_vrows(bvb, t, rmask, mv, vv, sv, V: tl.constexpr):
    """Value-side decay of rows t in the one-reference frame: bv [R, BV] and f = 2^(bv - mv) (within 2^(+-span/2))."""
    m = rmask[:, None] & (vv[None, :] < V)
    bv_s = tl.load(bvb + t[:, None] * sv + vv[None, :], mask=m, other=0.0)
    return bv_s, tl.exp2(tl.where(m, bv_s - mv[None, :], 0.0))


@triton.jit(do_not_specialize=["Hkv"])
def chunk_classify_kernel(b, bv, table, cu, count, work, Hkv, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                          BKF: tl.constexpr, BVF: tl.constexpr, FAST_SPAN: tl.constexpr, HAS_GV: tl.constexpr):
    """Append (chunk, kv-head) to the work list of the sub-chunk kernels when its decay span is too wide for one
    reference; the list's length ends in count[0]. Order is arbitrary, each item is written once."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, L = _chunk_bounds(table, cu, i_c, C)
    slow = (~_frames(b, bv, t0, i_h, L, Hkv, K, V, BKF, BVF, FAST_SPAN, HAS_GV)) & (L > 0)
    idx = tl.atomic_add(count, 1, mask=slow)
    tl.store(work + idx, i_c * Hkv + i_h, mask=slow)


def work_list(b: Tensor, table: Tensor, cu: Tensor, bv: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """Device-side list of the (chunk, kv-head) pairs that need the sub-chunk kernels, its length, and how many
    programs walk it (no host sync: the list's length is read by the kernels). ``bv``: the value-side cumulated
    decays ``[1, T, Hkv, V]``, or None."""
    _, _, Hkv, K = b.shape
    V = bv.shape[3] if bv is not None else 1
    slots = table.shape[0]
    count = torch.zeros(1, device=b.device, dtype=torch.int32)
    work = torch.empty(slots * Hkv, device=b.device, dtype=torch.int32)
    chunk_classify_kernel[(slots, Hkv)](b, bv if bv is not None else b, table, cu, count, work, Hkv, K=K, V=V,
                                        C=CHUNK, BKF=p2(K), BVF=p2(V), FAST_SPAN=cc.FAST_SPAN,
                                        HAS_GV=bv is not None, num_warps=1)
    return count, work, max(1, min(slots * Hkv, 4 * sm_count(b.device)))
