"""Value-side gates (gv) in the chunked GLA kernels: Triton device functions of the sub-chunk path.

With gv the decay of state entry (i, j) from token s to token t is 2^(b_ti - b_si) * 2^(bv_tj - bv_sj), so the
intra-chunk output of row t is ``sum_s A_ts (v_s * 2^(bv_t - bv_s))``: no longer one product A @ v. Chunks whose
decay spans are too wide for the one-reference path (``chunk_gv_fast.py``) come here; per row sub-chunk s (value
reference ref = bv at its first row):

- keys before the sub-chunk: ``2^(bv_t - ref) * (A @ (v * 2^(ref - bv_s)))``, both exponents <= 0;
- keys inside it (the diagonal block): elementwise, ``A_ts * v_s * 2^(bv_t - bv_s)`` with t >= s, exponent <= 0,
  whatever the key side does (its own diagonal follows SPAN_MAX as without gv).

The backward mirrors this: dv from ``scale * A^T`` and ``do``, the score gradient ``dA`` from ``do`` and ``v``
(the same structure as A from q and k, so the sub-chunk helpers of ``chunk_intra`` compute it), and the gradient
of the cumulated value decay is ``sum_g do * o - v * dv`` plus, at the chunk's last row, the state terms.
"""

from __future__ import annotations

import triton
import triton.language as tl

from surgery.kernels.gla.chunk_common import _chunk_bounds
from surgery.kernels.gla.chunk_intra import _diag_limit, _diag_scores, _rows, _scores


@triton.jit
def _gv_rows(bvb, t, rmask, s, L, vv, sv, V: tl.constexpr, BC: tl.constexpr):
    """bv of the rows [RS, BV], the sub-chunk's reference bv[s * BC] [BV] and f = 2^(bv_t - ref) (<= 1)."""
    vm = vv < V
    m = rmask[:, None] & vm[None, :]
    bv_t = tl.load(bvb + t[:, None] * sv + vv[None, :], mask=m, other=0.0)
    ref = tl.load(bvb + (s * BC) * sv + vv, mask=vm & (s * BC < L), other=0.0)
    return bv_t, ref, tl.exp2(tl.where(m, bv_t - ref[None, :], 0.0))


@triton.jit
def _gv_keys(vb, bvb, ref, s, L, vv, sv, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr):
    """The chunk's values v [C, BV] (fp32), their bv, and e = 2^(ref - bv_j) (<= 1) on the keys before sub-chunk s,
    0 elsewhere."""
    j = tl.arange(0, C)
    m = (j[:, None] < L) & (vv[None, :] < V)
    v_c = tl.load(vb + j[:, None] * sv + vv[None, :], mask=m, other=0.0).to(tl.float32)
    bv_c = tl.load(bvb + j[:, None] * sv + vv[None, :], mask=m, other=0.0)
    e = tl.exp2(tl.where(m & (j[:, None] < s * BC), ref[None, :] - bv_c, float("-inf")))
    return v_c, bv_c, e


@triton.jit
def _gv_diag_weight(bvb, bv_t, t, rmask, jc, L, vv, sv, V: tl.constexpr):
    """2^(bv_t - bv_jc) for the rows t >= jc [RS, BV], 0 elsewhere; every exponent is <= 0."""
    vm = vv < V
    bv_j = tl.load(bvb + jc * sv + vv, mask=vm & (jc < L), other=0.0)
    ok = rmask[:, None] & vm[None, :] & (t[:, None] >= jc) & (jc < L)
    return tl.exp2(tl.where(ok, bv_t - bv_j[None, :], float("-inf")))


@triton.jit
def _gv_intra_o(A, vb, bvb, t, rmask, s, L, vv, sv, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr):
    """Intra-chunk output of row sub-chunk s, sum_j A[t, j] v_j 2^(bv_t - bv_j), [RS, BV] fp32, from the causal
    scores A [RS, C] (diagonal block included)."""
    j = tl.arange(0, C)
    bv_t, ref, f = _gv_rows(bvb, t, rmask, s, L, vv, sv, V, BC)
    v_c, bv_c, e = _gv_keys(vb, bvb, ref, s, L, vv, sv, V, C, BC)
    dt = vb.dtype.element_ty
    out = tl.dot(tl.where(j[None, :] < s * BC, A, 0.0).to(dt), (v_c * e).to(dt)).to(tl.float32) * f
    for jj in range(0, BC):
        jc = s * BC + jj
        a = tl.sum(tl.where(j[None, :] == jc, A, 0.0), axis=1)
        v_j = tl.load(vb + jc * sv + vv, mask=(vv < V) & (jc < L), other=0.0).to(tl.float32)
        out += a[:, None] * v_j[None, :] * _gv_diag_weight(bvb, bv_t, t, rmask, jc, L, vv, sv, V)
    return out


@triton.jit
def _gv_intra_dv(acc, A, do_s, bvb, t, rmask, s, L, vv, sv, scale, V: tl.constexpr, C: tl.constexpr,
                 BC: tl.constexpr):
    """Add row sub-chunk s's share of the intra-chunk dv, sum_t scale * A[t, j] do_t 2^(bv_t - bv_j), to acc
    [C, BV]; do_s [RS, BV] fp32."""
    j = tl.arange(0, C)
    bv_t, ref, f = _gv_rows(bvb, t, rmask, s, L, vv, sv, V, BC)
    m = (j[:, None] < L) & (vv[None, :] < V)
    bv_c = tl.load(bvb + j[:, None] * sv + vv[None, :], mask=m, other=0.0)
    e = tl.exp2(tl.where(m & (j[:, None] < s * BC), ref[None, :] - bv_c, float("-inf")))
    A = A * scale
    acc += tl.dot(tl.trans(tl.where(j[None, :] < s * BC, A, 0.0)), do_s * f) * e
    for jj in range(0, BC):
        jc = s * BC + jj
        a = tl.sum(tl.where(j[None, :] == jc, A, 0.0), axis=1)
        d = tl.sum(a[:, None] * do_s * _gv_diag_weight(bvb, bv_t, t, rmask, jc, L, vv, sv, V), axis=0)
        acc += tl.where(j[:, None] == jc, d[None, :], 0.0)
    return acc


@triton.jit
def _inter_o(qb, bb, hb, t, g, rmask, vv, sq, sk, K: tl.constexpr, V: tl.constexpr, BKI: tl.constexpr,
             RS: tl.constexpr, BV: tl.constexpr):
    """(q_t * 2^b_t) @ H for the rows of a sub-chunk, [RS, BV] fp32 (no value-side decay, no scale)."""
    acc = tl.zeros([RS, BV], dtype=tl.float32)
    vm = vv < V
    for k0 in tl.static_range(0, K, BKI):
        kk = k0 + tl.arange(0, BKI)
        qm = rmask[:, None] & (kk[None, :] < K)
        q_s = tl.load(qb + t[:, None] * sq + g[:, None] * K + kk[None, :], mask=qm, other=0.0).to(tl.float32)
        b_s = tl.load(bb + t[:, None] * sk + kk[None, :], mask=qm, other=0.0)
        h_kb = tl.load(hb + kk[:, None] * V + vv[None, :], mask=(kk[:, None] < K) & vm[None, :], other=0.0)
        acc += tl.dot((q_s * tl.exp2(b_s)).to(h_kb.dtype), h_kb)
    return acc


@triton.jit
def _dv_gv_sub_chunks(i_c, i_h, i_v, q, k, v, b, bv, h, do, dh, dv, dbv, table, cu, scale, Hkv, K: tl.constexpr,
                      V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                      BKI: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, SPAN_MAX: tl.constexpr):
    """dv and d/dbv (the cumulated value decay) for one (chunk, kv-head, V-block), with value-side gates.

    dv = the intra-chunk part (``_gv_intra_dv``) + ((k * 2^(B - b)) @ dH) * 2^(Bv - bv). d/dbv = sum_g do * o - v * dv,
    plus at the chunk's last row sum_K(H * dH * 2^B) * 2^Bv + sum_j v_j * dv_inter_j. The do * o rows go to dbv
    first (o recomputed in fp32) and are read back after a barrier, as in ``_dqkg_sub_chunks``.
    """
    t0, L = _chunk_bounds(table, cu, i_c, C)
    Hq = Hkv * G
    RS: tl.constexpr = BC * GP
    sq, sk, sv, so = Hq * K, Hkv * K, Hkv * V, Hq * V
    qb = q + (t0 * Hq + i_h * G) * K
    kb = k + (t0 * Hkv + i_h) * K
    bb = b + (t0 * Hkv + i_h) * K
    vb = v + (t0 * Hkv + i_h) * V
    bvb = bv + (t0 * Hkv + i_h) * V
    dob = do + (t0 * Hq + i_h * G) * V
    hb = h + (i_c.to(tl.int64) * Hkv + i_h) * (K * V)
    dhb = dh + (i_c.to(tl.int64) * Hkv + i_h) * (K * V)
    j = tl.arange(0, C)
    vv = i_v * BV + tl.arange(0, BV)
    vm = vv < V
    jv = (j[:, None] < L) & vm[None, :]
    acc = tl.zeros([C, BV], dtype=tl.float32)
    for s in range(0, tl.cdiv(L, BC)):
        t, g, rmask = _rows(s, L, G, GP, BC)
        slow, lim = _diag_limit(bb, s, L, sk, K, BC, BKF, SPAN_MAX)
        A = _scores(qb, kb, bb, t, g, rmask, s, L, lim, sq, sk, K, C, BC, BKI, RS)
        if slow:
            A = _diag_scores(A, qb, kb, bb, t, g, rmask, s, L, sq, sk, K, C, BC, BKI, RS)
        do_s = tl.load(dob + t[:, None] * so + g[:, None] * V + vv[None, :], mask=rmask[:, None] & vm[None, :],
                       other=0.0).to(tl.float32)
        acc = _gv_intra_dv(acc, A, do_s, bvb, t, rmask, s, L, vv, sv, scale, V, C, BC)
        bv_t, ref, f = _gv_rows(bvb, t, rmask, s, L, vv, sv, V, BC)
        o_s = _inter_o(qb, bb, hb, t, g, rmask, vv, sq, sk, K, V, BKI, RS, BV) * tl.exp2(bv_t)
        o_s = (o_s + _gv_intra_o(A, vb, bvb, t, rmask, s, L, vv, sv, V, C, BC)) * scale
        # rows are (time, head): fold the group's heads into one row per time
        dov = tl.sum(tl.reshape(do_s * o_s, [BC, GP, BV]), axis=1)
        tq = s * BC + tl.arange(0, BC)
        tl.store(dbv + (t0 * Hkv + i_h) * V + tq[:, None] * sv + vv[None, :], dov,
                 mask=(tq[:, None] < L) & vm[None, :])
    dvi = tl.zeros([C, BV], dtype=tl.float32)
    hdh = tl.zeros([BV], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BKI):
        kk = k0 + tl.arange(0, BKI)
        km = kk < K
        jm = (j[:, None] < L) & km[None, :]
        k_c = tl.load(kb + j[:, None] * sk + kk[None, :], mask=jm, other=0.0)
        b_c = tl.load(bb + j[:, None] * sk + kk[None, :], mask=jm, other=0.0)
        b_last = tl.load(bb + (L - 1) * sk + kk, mask=km & (L > 0), other=0.0)
        hm = km[:, None] & vm[None, :] & (L > 0)
        dh_kb = tl.load(dhb + kk[:, None] * V + vv[None, :], mask=hm, other=0.0)
        h_kb = tl.load(hb + kk[:, None] * V + vv[None, :], mask=hm, other=0.0)
        dvi += tl.dot((k_c * tl.exp2(b_last[None, :] - b_c)).to(dh_kb.dtype), dh_kb)
        hdh += tl.sum(h_kb.to(tl.float32) * dh_kb.to(tl.float32) * tl.exp2(b_last)[:, None], axis=0)
    bv_c = tl.load(bvb + j[:, None] * sv + vv[None, :], mask=jv, other=0.0)
    bv_last = tl.load(bvb + (L - 1) * sv + vv, mask=vm & (L > 0), other=0.0)
    dvi = dvi * tl.exp2(tl.where(jv, bv_last[None, :] - bv_c, 0.0))
    dv_c = acc + dvi
    tl.store(dv + (t0 * Hkv + i_h) * V + j[:, None] * sv + vv[None, :], dv_c.to(dv.dtype.element_ty), mask=jv)
    v_c = tl.load(vb + j[:, None] * sv + vv[None, :], mask=jv, other=0.0).to(tl.float32)
    d_end = hdh * tl.exp2(bv_last) + tl.sum(v_c * dvi, axis=0)
    tl.debug_barrier()
    dbvb = dbv + (t0 * Hkv + i_h) * V + j[:, None] * sv + vv[None, :]
    g_c = tl.load(dbvb, mask=jv, other=0.0) - v_c * dv_c + tl.where(j[:, None] == L - 1, d_end[None, :], 0.0)
    tl.store(dbvb, g_c, mask=jv)


@triton.jit(do_not_specialize=["Hkv", "NW"])
def chunk_bwd_dv_gv_kernel(q, k, v, b, bv, h, do, dh, dv, dbv, table, cu, count, work, NW, scale, Hkv,
                           K: tl.constexpr, V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr,
                           BC: tl.constexpr, BKI: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
                           SPAN_MAX: tl.constexpr):
    """dv and d/dbv for the work-listed chunks (with gv: all of them), by row sub-chunk."""
    i_w, i_v = tl.program_id(0), tl.program_id(2)
    for it in range(i_w, tl.load(count), NW):
        item = tl.load(work + it)
        _dv_gv_sub_chunks(item // Hkv, item % Hkv, i_v, q, k, v, b, bv, h, do, dh, dv, dbv, table, cu, scale, Hkv,
                          K, V, G, GP, C, BC, BKI, BKF, BV, SPAN_MAX)
