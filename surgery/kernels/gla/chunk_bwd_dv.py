"""Backward of the chunked GLA kernels without value-side gates: dv, on the one-reference and the sub-chunk path.

dv = scale * A^T do (summed over the GQA group) + (k * 2^(B - b)) @ dH, where dH is the gradient of the state after
the chunk. With value-side gates the dv kernels are ``chunk_gv.py`` and ``chunk_gv_fast.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from surgery.kernels.gla.chunk_common import _chunk_bounds
from surgery.kernels.gla.chunk_intra import (
    _chunk_frame,
    _diag_limit,
    _diag_scores,
    _frame_keys,
    _frame_rows,
    _rows,
    _scores,
)


@triton.jit
def _dv_sub_chunks(i_c, i_h, i_v, q, k, b, do, dh, dv, table, cu, scale, Hkv, K: tl.constexpr, V: tl.constexpr,
                   G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BKI: tl.constexpr,
                   BKF: tl.constexpr, BV: tl.constexpr, SPAN_MAX: tl.constexpr):
    """dv for one (chunk, kv-head, V-block) = scale * A^T do (summed over the group) + (k * 2^(B-b)) dH."""
    t0, L = _chunk_bounds(table, cu, i_c, C)
    Hq = Hkv * G
    RS: tl.constexpr = BC * GP
    sq, sk, sv, so = Hq * K, Hkv * K, Hkv * V, Hq * V
    qb = q + (t0 * Hq + i_h * G) * K
    kb = k + (t0 * Hkv + i_h) * K
    bb = b + (t0 * Hkv + i_h) * K
    dob = do + (t0 * Hq + i_h * G) * V
    dhb = dh + (i_c.to(tl.int64) * Hkv + i_h) * (K * V)
    j = tl.arange(0, C)
    vv = i_v * BV + tl.arange(0, BV)
    vm = vv < V
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for s in range(0, tl.cdiv(L, BC)):
        t, g, rmask = _rows(s, L, G, GP, BC)
        slow, lim = _diag_limit(bb, s, L, sk, K, BC, BKF, SPAN_MAX)
        A = _scores(qb, kb, bb, t, g, rmask, s, L, lim, sq, sk, K, C, BC, BKI, RS)
        if slow:
            A = _diag_scores(A, qb, kb, bb, t, g, rmask, s, L, sq, sk, K, C, BC, BKI, RS)
        do_s = tl.load(dob + t[:, None] * so + g[:, None] * V + vv[None, :], mask=rmask[:, None] & vm[None, :],
                       other=0.0)
        acc += tl.dot(tl.trans(A * scale).to(do_s.dtype), do_s)
    for k0 in tl.static_range(0, K, BKI):
        kk = k0 + tl.arange(0, BKI)
        km = kk < K
        jm = (j[:, None] < L) & km[None, :]
        k_c = tl.load(kb + j[:, None] * sk + kk[None, :], mask=jm, other=0.0)
        b_c = tl.load(bb + j[:, None] * sk + kk[None, :], mask=jm, other=0.0)
        b_last = tl.load(bb + (L - 1) * sk + kk, mask=km & (L > 0), other=0.0)
        dh_kb = tl.load(dhb + kk[:, None] * V + vv[None, :], mask=km[:, None] & vm[None, :] & (L > 0), other=0.0)
        acc += tl.dot((k_c * tl.exp2(b_last[None, :] - b_c)).to(dh_kb.dtype), dh_kb)
    tl.store(dv + (t0 * Hkv + i_h) * V + j[:, None] * sv + vv[None, :], acc.to(dv.dtype.element_ty),
             mask=(j[:, None] < L) & vm[None, :])


@triton.jit(do_not_specialize=["Hkv"])
def chunk_bwd_dv_fast_kernel(q, k, b, do, dh, dv, table, cu, scale, Hkv, K: tl.constexpr, V: tl.constexpr,
                             G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr, RB: tl.constexpr,
                             BK: tl.constexpr, BV: tl.constexpr, FAST_SPAN: tl.constexpr):
    """dv for one (chunk, kv-head, V-block) on the one-reference path."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_bounds(table, cu, i_c, C)
    sq, sk, sv, so = Hkv * G * K, Hkv * K, Hkv * V, Hkv * G * V
    bb = b + (t0 * Hkv + i_h) * K
    if _chunk_frame(bb, L, sk, K, BK, FAST_SPAN):
        qb = q + (t0 * Hkv * G + i_h * G) * K
        dob = do + (t0 * Hkv * G + i_h * G) * V
        kk = tl.arange(0, BK)
        j = tl.arange(0, C)
        vv = i_v * BV + tl.arange(0, BV)
        vm = vv < V
        m, last, k_c, b_c, k_hat = _frame_keys(k + (t0 * Hkv + i_h) * K, bb, L, kk, sk, K, C)
        dh_t = tl.load(dh + (i_c.to(tl.int64) * Hkv + i_h) * (K * V) + kk[:, None] * V + vv[None, :],
                       mask=(kk[:, None] < K) & vm[None, :], other=0.0)
        k_dec = k_c * tl.exp2(tl.where((j[:, None] < L) & (kk[None, :] < K), last[None, :] - b_c, 0.0))
        acc = tl.dot(k_dec.to(dh_t.dtype), dh_t)
        for s in range(0, tl.cdiv(L, RB)):
            t, g, rmask, q_s, b_s, f_q = _frame_rows(qb, bb, s, L, m, kk, sq, sk, K, G, GP, RB)
            A = tl.dot(q_s * f_q, tl.trans(k_hat))
            A = tl.where(j[None, :] <= t[:, None], A * scale, 0.0)
            do_s = tl.load(dob + t[:, None] * so + g[:, None] * V + vv[None, :], mask=rmask[:, None] & vm[None, :],
                           other=0.0)
            acc += tl.dot(tl.trans(A).to(do_s.dtype), do_s)
        tl.store(dv + (t0 * Hkv + i_h) * V + j[:, None] * sv + vv[None, :], acc.to(dv.dtype.element_ty),
                 mask=(j[:, None] < L) & vm[None, :])


@triton.jit(do_not_specialize=["Hkv", "NW"])
def chunk_bwd_dv_kernel(q, k, b, do, dh, dv, table, cu, count, work, NW, scale, Hkv, K: tl.constexpr,
                        V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                        BKI: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, SPAN_MAX: tl.constexpr):
    """dv for the work-listed chunks, by row sub-chunk."""
    i_w, i_v = tl.program_id(0), tl.program_id(2)
    for it in range(i_w, tl.load(count), NW):
        item = tl.load(work + it)
        _dv_sub_chunks(item // Hkv, item % Hkv, i_v, q, k, b, do, dh, dv, table, cu, scale, Hkv, K, V, G, GP, C, BC,
                       BKI, BKF, BV, SPAN_MAX)
