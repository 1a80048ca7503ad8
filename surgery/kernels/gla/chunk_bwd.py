"""Backward of the chunked GLA kernels: dq, dk and the gradient of the cumulated decay, and the launcher
(``chunk_gla_bwd``) that runs the state-gradient pass, the dv kernels (``chunk_bwd_dv``, ``chunk_gv*``) and these."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from surgery.kernels.gla import chunk_common as cc
from surgery.kernels.gla.chunk_bwd_dv import chunk_bwd_dv_fast_kernel, chunk_bwd_dv_kernel
from surgery.kernels.gla.chunk_common import (
    CHUNK,
    LOG2E,
    _chunk_bounds,
    chunk_local_cumsum,
    chunk_states,
    p2,
    prepare_chunks,
    sub_rows,
)
from surgery.kernels.gla.chunk_gv import _gv_keys, _gv_rows, chunk_bwd_dv_gv_kernel
from surgery.kernels.gla.chunk_gv_fast import chunk_bwd_dv_gv_fast_kernel
from surgery.kernels.gla.chunk_intra import (
    _diag_grads,
    _diag_limit,
    _diag_scores,
    _frame_keys,
    _frame_rows,
    _frame_vrows,
    _frames,
    _rows,
    _tiles,
    work_list,
)


@triton.jit
def _dqkg_sub_chunks(i_c, i_h, i_k, q, k, v, b, bv, h, do, dh, dq, dk, dg, table, cu, scale, Hkv, K: tl.constexpr,
                     V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                     BK: tl.constexpr, BKF: tl.constexpr, BVI: tl.constexpr, SPAN_MAX: tl.constexpr,
                     HAS_GV: tl.constexpr):
    """dq (per query head), dk and the gradient w.r.t. the cumulated decay b, for one (chunk, kv-head, K-block).

    d/db = sum_g q*dq - k*dk, plus at the chunk's last row sum_V(H * dH) * 2^B + sum_j k_j * dk_inter_j; a
    reverse chunk-local cumsum then gives d/dgk. The q*dq rows go to dg first and are read back after a barrier
    (the same program wrote them).
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
    k0 = i_k * BK
    kk = k0 + tl.arange(0, BK)
    km = kk < K
    j = tl.arange(0, C)
    jm = j < L
    dk_acc = tl.zeros([C, BK], dtype=tl.float32)
    for s in range(0, tl.cdiv(L, BC)):
        t, g, rmask = _rows(s, L, G, GP, BC)
        slow, lim = _diag_limit(bb, s, L, sk, K, BC, BKF, SPAN_MAX)
        q_s, b_s, f_q, e, k_hat = _tiles(qb, kb, bb, t, g, rmask, s * BC, L, lim, k0, sq, sk, K, C, BK)
        dA = tl.zeros([RS, C], dtype=tl.float32)
        dq_inter = tl.zeros([RS, BK], dtype=tl.float32)
        for v0 in tl.static_range(0, V, BVI):
            vv = v0 + tl.arange(0, BVI)
            vm = vv < V
            do_s = tl.load(dob + t[:, None] * so + g[:, None] * V + vv[None, :], mask=rmask[:, None] & vm[None, :],
                           other=0.0)
            v_c = tl.load(vb + j[:, None] * sv + vv[None, :], mask=jm[:, None] & vm[None, :], other=0.0)
            h_kb = tl.load(hb + kk[:, None] * V + vv[None, :], mask=km[:, None] & vm[None, :], other=0.0)
            if HAS_GV:
                # dA/scale = sum_V do_t v_j 2^(bv_t - bv_j): keys before the sub-chunk in its frame here, the
                # diagonal block elementwise below (chunk_gv)
                bv_t, ref, f = _gv_rows(bvb, t, rmask, s, L, vv, sv, V, BC)
                v32, bv_c, e_v = _gv_keys(vb, bvb, ref, s, L, vv, sv, V, C, BC)
                do32 = do_s.to(tl.float32)
                dA += tl.dot(do32 * f, tl.trans(v32 * e_v))
                dq_inter += tl.dot((do32 * tl.exp2(bv_t)).to(h_kb.dtype), tl.trans(h_kb))
            else:
                dA += tl.dot(do_s, tl.trans(v_c))
                dq_inter += tl.dot(do_s, tl.trans(h_kb))
        if HAS_GV:
            dA = _diag_scores(dA, dob, vb, bvb, t, g, rmask, s, L, so, sv, V, C, BC, BVI, RS)
        dA = tl.where(j[None, :] <= t[:, None], dA * scale, 0.0)
        # sum_j dA k_hat is the gradient in the sub-chunk's reference frame; f_q = 2^(b - ref) takes it to q's
        dq_s = tl.dot(dA, k_hat) * f_q + dq_inter * scale * tl.exp2(b_s)
        dk_acc += tl.dot(tl.trans(dA), q_s * f_q) * e
        if slow:
            dq_s, dk_acc = _diag_grads(dq_s, dk_acc, dA, q_s, b_s, t, rmask, kb, bb, kk, s, L, sk, K, C, BC)
        tl.store(dq + (t0 * Hq + i_h * G) * K + t[:, None] * sq + g[:, None] * K + kk[None, :],
                 dq_s.to(dq.dtype.element_ty), mask=rmask[:, None] & km[None, :])
        # sum over the group's heads: rows are (time, head), so fold the head axis away
        qdq = tl.sum(tl.reshape(q_s * dq_s, [BC, GP, BK]), axis=1)
        tq = s * BC + tl.arange(0, BC)
        tl.store(dg + (t0 * Hkv + i_h) * K + tq[:, None] * sk + kk[None, :], qdq,
                 mask=(tq[:, None] < L) & km[None, :])
    # inter-chunk terms for the keys and the chunk-end decay
    dk_inter = tl.zeros([C, BK], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)
    for v0 in tl.static_range(0, V, BVI):
        vv = v0 + tl.arange(0, BVI)
        vm = vv < V
        v_c = tl.load(vb + j[:, None] * sv + vv[None, :], mask=jm[:, None] & vm[None, :], other=0.0)
        dh_kb = tl.load(dhb + kk[:, None] * V + vv[None, :], mask=km[:, None] & vm[None, :] & (L > 0), other=0.0)
        h_kb = tl.load(hb + kk[:, None] * V + vv[None, :], mask=km[:, None] & vm[None, :] & (L > 0), other=0.0)
        if HAS_GV:
            jv = jm[:, None] & vm[None, :]
            bv_c = tl.load(bvb + j[:, None] * sv + vv[None, :], mask=jv, other=0.0)
            bv_last = tl.load(bvb + (L - 1) * sv + vv, mask=vm & (L > 0), other=0.0)
            v_dec = v_c.to(tl.float32) * tl.exp2(tl.where(jv, bv_last[None, :] - bv_c, 0.0))
            dk_inter += tl.dot(v_dec.to(v_c.dtype), tl.trans(dh_kb))
            hdh += tl.sum(h_kb.to(tl.float32) * dh_kb.to(tl.float32) * tl.exp2(bv_last)[None, :], axis=1)
        else:
            dk_inter += tl.dot(v_c, tl.trans(dh_kb))
            hdh += tl.sum(h_kb.to(tl.float32) * dh_kb.to(tl.float32), axis=1)
    jk = jm[:, None] & km[None, :]
    k_c = tl.load(kb + j[:, None] * sk + kk[None, :], mask=jk, other=0.0).to(tl.float32)
    b_c = tl.load(bb + j[:, None] * sk + kk[None, :], mask=jk, other=0.0)
    b_last = tl.load(bb + (L - 1) * sk + kk, mask=km & (L > 0), other=0.0)
    dk_inter = dk_inter * tl.exp2(b_last[None, :] - b_c)
    dk_c = dk_acc + dk_inter
    tl.store(dk + (t0 * Hkv + i_h) * K + j[:, None] * sk + kk[None, :], dk_c.to(dk.dtype.element_ty), mask=jk)
    d_end = hdh * tl.exp2(b_last) + tl.sum(k_c * dk_inter, axis=0)
    tl.debug_barrier()
    dgb = dg + (t0 * Hkv + i_h) * K + j[:, None] * sk + kk[None, :]
    g_c = tl.load(dgb, mask=jk, other=0.0) - k_c * dk_c + tl.where(j[:, None] == L - 1, d_end[None, :], 0.0)
    tl.store(dgb, g_c, mask=jk)


@triton.jit(do_not_specialize=["Hkv"])
def chunk_bwd_dqkg_fast_kernel(q, k, v, b, bv, h, do, dh, dq, dk, dg, table, cu, scale, Hkv, K: tl.constexpr,
                               V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr,
                               RB: tl.constexpr, BK: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
                               FAST_SPAN: tl.constexpr, HAS_GV: tl.constexpr):
    """dq, dk and d/db for one (chunk, kv-head, K-block) on the one-reference path (see chunk_bwd_dqkg_kernel).
    With HAS_GV: dA / scale = (do * 2^(bv - mv)) @ (v * 2^(mv - bv))^T, and the inter terms carry 2^bv."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_bounds(table, cu, i_c, C)
    sq, sk, sv, so = Hkv * G * K, Hkv * K, Hkv * V, Hkv * G * V
    bb = b + (t0 * Hkv + i_h) * K
    if _frames(b, bv, t0, i_h, L, Hkv, K, V, BKF, BV, FAST_SPAN, HAS_GV):
        qb = q + (t0 * Hkv * G + i_h * G) * K
        dob = do + (t0 * Hkv * G + i_h * G) * V
        kb = k + (t0 * Hkv + i_h) * K
        kk = i_k * BK + tl.arange(0, BK)
        km = kk < K
        j = tl.arange(0, C)
        jm = j < L
        jk = jm[:, None] & km[None, :]
        vv = tl.arange(0, BV)
        vm = vv < V
        m, last, k_c, b_c, k_hat = _frame_keys(kb, bb, L, kk, sk, K, C)
        v_c = tl.load(v + (t0 * Hkv + i_h) * V + j[:, None] * sv + vv[None, :], mask=jm[:, None] & vm[None, :],
                      other=0.0)
        hv_off = (i_c.to(tl.int64) * Hkv + i_h) * (K * V) + kk[:, None] * V + vv[None, :]
        h_t = tl.load(h + hv_off, mask=km[:, None] & vm[None, :], other=0.0)
        if HAS_GV:
            bvb = bv + (t0 * Hkv + i_h) * V
            mv, bv_last, v32, bv_c, v_hat = _frame_keys(v + (t0 * Hkv + i_h) * V, bvb, L, vv, sv, V, C)
        dk_acc = tl.zeros([C, BK], dtype=tl.float32)
        for s in range(0, tl.cdiv(L, RB)):
            t, g, rmask, q_s, b_s, f_q = _frame_rows(qb, bb, s, L, m, kk, sq, sk, K, G, GP, RB)
            do_s = tl.load(dob + t[:, None] * so + g[:, None] * V + vv[None, :], mask=rmask[:, None] & vm[None, :],
                           other=0.0)
            if HAS_GV:
                bv_s, f_v = _frame_vrows(bvb, t, rmask, mv, vv, sv, V)
                do32 = do_s.to(tl.float32)
                dA = tl.dot(do32 * f_v, tl.trans(v_hat))
                dq_h = tl.dot((do32 * tl.exp2(bv_s)).to(h_t.dtype), tl.trans(h_t))
            else:
                dA = tl.dot(do_s, tl.trans(v_c))
                dq_h = tl.dot(do_s, tl.trans(h_t))
            dA = tl.where(j[None, :] <= t[:, None], dA * scale, 0.0)
            dq_s = tl.dot(dA, k_hat) * f_q + dq_h * scale * tl.exp2(b_s)
            dk_acc += tl.dot(tl.trans(dA), q_s * f_q)
            tl.store(dq + (t0 * Hkv * G + i_h * G) * K + t[:, None] * sq + g[:, None] * K + kk[None, :],
                     dq_s.to(dq.dtype.element_ty), mask=rmask[:, None] & km[None, :])
            qdq = tl.sum(tl.reshape(q_s * dq_s, [RB, GP, BK]), axis=1)
            tq = s * RB + tl.arange(0, RB)
            tl.store(dg + (t0 * Hkv + i_h) * K + tq[:, None] * sk + kk[None, :], qdq,
                     mask=(tq[:, None] < L) & km[None, :])
        dh_t = tl.load(dh + hv_off, mask=km[:, None] & vm[None, :], other=0.0)
        hdh = h_t.to(tl.float32) * dh_t.to(tl.float32)
        if HAS_GV:
            jv = jm[:, None] & vm[None, :]
            v_dec = (v32 * tl.exp2(tl.where(jv, bv_last[None, :] - bv_c, 0.0))).to(v_c.dtype)
            dk_inter = tl.dot(v_dec, tl.trans(dh_t))
            hdh = hdh * tl.exp2(bv_last)[None, :]
        else:
            dk_inter = tl.dot(v_c, tl.trans(dh_t))
        dk_inter = dk_inter * tl.exp2(tl.where(jk, last[None, :] - b_c, 0.0))
        dk_c = dk_acc * tl.exp2(tl.where(jk, m[None, :] - b_c, 0.0)) + dk_inter
        tl.store(dk + (t0 * Hkv + i_h) * K + j[:, None] * sk + kk[None, :], dk_c.to(dk.dtype.element_ty), mask=jk)
        d_end = tl.sum(hdh, axis=1) * tl.exp2(last) + tl.sum(k_c * dk_inter, axis=0)
        tl.debug_barrier()
        dgb = dg + (t0 * Hkv + i_h) * K + j[:, None] * sk + kk[None, :]
        g_c = tl.load(dgb, mask=jk, other=0.0) - k_c * dk_c + tl.where(j[:, None] == L - 1, d_end[None, :], 0.0)
        tl.store(dgb, g_c, mask=jk)


@triton.jit(do_not_specialize=["Hkv", "NW"])
def chunk_bwd_dqkg_kernel(q, k, v, b, bv, h, do, dh, dq, dk, dg, table, cu, count, work, NW, scale, Hkv,
                          K: tl.constexpr, V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr,
                          BC: tl.constexpr, BK: tl.constexpr, BKF: tl.constexpr, BVI: tl.constexpr,
                          SPAN_MAX: tl.constexpr, HAS_GV: tl.constexpr):
    """dq, dk, d/db for the work-listed chunks, by row sub-chunk."""
    i_w, i_k = tl.program_id(0), tl.program_id(2)
    for it in range(i_w, tl.load(count), NW):
        item = tl.load(work + it)
        _dqkg_sub_chunks(item // Hkv, item % Hkv, i_k, q, k, v, b, bv, h, do, dh, dq, dk, dg, table, cu, scale, Hkv,
                         K, V, G, GP, C, BC, BK, BKF, BVI, SPAN_MAX, HAS_GV)


def chunk_gla_bwd(q: Tensor, k: Tensor, v: Tensor, gk: Tensor, gv: Tensor | None, scale: float, h0: Tensor | None,
                  cu_seqlens: Tensor | None, do: Tensor, dht: Tensor | None, b: Tensor | None = None,
                  bv: Tensor | None = None, h: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Gradients (dq, dk, dv, dgk, dgv or None, dh0) for ``chunk_gla_fwd``; b, bv and h are recomputed unless h
    is given (then b, and bv when gv is given, must be too)."""
    B, T, Hq, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    G = Hq // Hkv
    GP, BC = sub_rows(G)
    cu, table, offsets, N, slots = prepare_chunks(cu_seqlens, B, T, q.device)
    flat = (lambda x: x.reshape(1, B * T, *x.shape[2:]))
    if h is None:
        b = chunk_local_cumsum(flat(gk), table, cu, LOG2E, False, torch.float32)
        bv = chunk_local_cumsum(flat(gv), table, cu, LOG2E, False, torch.float32) if gv is not None else None
        h, _ = chunk_states(k, v, b, bv, h0, False, 1.0, table, cu, offsets, N, False, v.dtype)
    dh, dh0 = chunk_states(q, do, b, bv, dht, h0 is not None, scale, table, cu, offsets, N, True, v.dtype)
    BKF, BVF = p2(K), p2(V)
    slow = dict(K=K, V=V, G=G, GP=GP, C=CHUNK, BC=BC, BKF=BKF, SPAN_MAX=cc.SPAN_MAX, num_stages=1)
    dv = torch.empty_like(v)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    db = torch.empty(B, T, Hkv, K, device=q.device, dtype=torch.float32)
    dbv = None
    has_gv = bv is not None
    bv_arg = bv if has_gv else b  # never read without HAS_GV
    common = dict(K=K, V=V, G=G, GP=GP, C=CHUNK, FAST_SPAN=cc.FAST_SPAN)
    if not has_gv:
        BV = min(cc.CONFIG["bv_fdv"], BVF)
        chunk_bwd_dv_fast_kernel[(slots, Hkv, triton.cdiv(V, BV))](q, k, b, do, dh, dv, table, cu, scale, Hkv,
                                                                   RB=64 // GP, BK=BKF, BV=BV,
                                                                   num_stages=cc.CONFIG["stages_fdv"],
                                                                   num_warps=cc.CONFIG["warps_fdv"], **common)
        count, work, NW = work_list(b, table, cu)
        BV = min(cc.CONFIG["bv_dv"], BVF)
        chunk_bwd_dv_kernel[(NW, 1, triton.cdiv(V, BV))](q, k, b, do, dh, dv, table, cu, count, work, NW, scale, Hkv,
                                                         BKI=min(cc.CONFIG["bki"], BKF), BV=BV,
                                                         num_warps=cc.CONFIG["warps_dv"], **slow)
    else:  # value-side gates: dv and d/dbv in their own kernels (chunk_gv)
        dbv = torch.empty(B, T, Hkv, V, device=q.device, dtype=torch.float32)
        BV = min(cc.CONFIG["bv_fdv"], BVF)
        chunk_bwd_dv_gv_fast_kernel[(slots, Hkv, triton.cdiv(V, BV))](q, k, v, b, bv, h, do, dh, dv, dbv, table, cu,
                                                                      scale, Hkv, RB=64 // GP, BK=BKF, BV=BV,
                                                                      BVF=BVF, num_stages=cc.CONFIG["stages_fdv"],
                                                                      num_warps=cc.CONFIG["warps_fdv"], **common)
        count, work, NW = work_list(b, table, cu, bv)
        BV = min(cc.CONFIG["bv_dv"], BVF)
        chunk_bwd_dv_gv_kernel[(NW, 1, triton.cdiv(V, BV))](q, k, v, b, bv, h, do, dh, dv, dbv, table, cu, count,
                                                            work, NW, scale, Hkv, BKI=min(cc.CONFIG["bki"], BKF),
                                                            BV=BV, num_warps=cc.CONFIG["warps_dv"], **slow)
    BK = min(cc.CONFIG["bk_fdq"], BKF)
    chunk_bwd_dqkg_fast_kernel[(slots, Hkv, triton.cdiv(K, BK))](q, k, v, b, bv_arg, h, do, dh, dq, dk, db, table,
                                                                 cu, scale, Hkv, RB=64 // GP, BK=BK, BKF=BKF,
                                                                 BV=BVF, HAS_GV=has_gv,
                                                                 num_warps=cc.CONFIG["warps_fdq"],
                                                                 num_stages=cc.CONFIG["stages_fdq"], **common)
    BK = min(cc.CONFIG["bk_dqk"], BKF)
    chunk_bwd_dqkg_kernel[(NW, 1, triton.cdiv(K, BK))](q, k, v, b, bv_arg, h, do, dh, dq, dk, db, table, cu, count,
                                                       work, NW, scale, Hkv, BK=BK,
                                                       BVI=min(cc.CONFIG["bvi_dqk"], BVF), HAS_GV=has_gv,
                                                       num_warps=cc.CONFIG["warps_dqk"], **slow)
    dg = chunk_local_cumsum(flat(db), table, cu, 1.0, True, gk.dtype).view_as(gk)
    dgv = chunk_local_cumsum(flat(dbv), table, cu, 1.0, True, gv.dtype).view_as(gv) if gv is not None else None
    return dq, dk, dv, dg, dgv, dh0
