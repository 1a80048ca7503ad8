"""Forward of the chunked GLA kernels: outputs from the chunk states and the intra-chunk scores."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from surgery.kernels.gla import chunk_common as cc
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
from surgery.kernels.gla.chunk_gv import _gv_intra_o, _gv_rows
from surgery.kernels.gla.chunk_intra import (
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
def _fwd_o_sub_chunks(i_c, i_h, i_v, q, k, v, b, bv, h, o, table, cu, scale, Hkv, K: tl.constexpr,
                      V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                      BKI: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, SPAN_MAX: tl.constexpr,
                      HAS_GV: tl.constexpr):
    """o for one (chunk, kv-head, V-block): inter-chunk part from h plus intra-chunk scores, by row sub-chunk.
    With HAS_GV the value-side decays (bv) apply as in ``chunk_gv``."""
    t0, L = _chunk_bounds(table, cu, i_c, C)
    Hq = Hkv * G
    RS: tl.constexpr = BC * GP
    sq, sk, sv, so = Hq * K, Hkv * K, Hkv * V, Hq * V
    qb = q + (t0 * Hq + i_h * G) * K
    kb = k + (t0 * Hkv + i_h) * K
    bb = b + (t0 * Hkv + i_h) * K
    hb = h + (i_c.to(tl.int64) * Hkv + i_h) * (K * V)
    ob = o + (t0 * Hq + i_h * G) * V
    vb = v + (t0 * Hkv + i_h) * V
    bvb = bv + (t0 * Hkv + i_h) * V
    j = tl.arange(0, C)
    vv = i_v * BV + tl.arange(0, BV)
    vm = vv < V
    v_c = tl.load(vb + j[:, None] * sv + vv[None, :], mask=(j[:, None] < L) & vm[None, :], other=0.0)
    for s in range(0, tl.cdiv(L, BC)):
        t, g, rmask = _rows(s, L, G, GP, BC)
        slow, lim = _diag_limit(bb, s, L, sk, K, BC, BKF, SPAN_MAX)
        A = tl.zeros([RS, C], dtype=tl.float32)
        acc = tl.zeros([RS, BV], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BKI):
            q_s, b_s, f_q, e, k_hat = _tiles(qb, kb, bb, t, g, rmask, s * BC, L, lim, k0, sq, sk, K, C, BKI)
            A += tl.dot(q_s * f_q, tl.trans(k_hat))
            kk = k0 + tl.arange(0, BKI)
            h_kb = tl.load(hb + kk[:, None] * V + vv[None, :], mask=(kk[:, None] < K) & vm[None, :], other=0.0)
            acc += tl.dot((q_s * tl.exp2(b_s)).to(h_kb.dtype), h_kb)
        A = tl.where(j[None, :] <= t[:, None], A, 0.0)
        if slow:
            A = _diag_scores(A, qb, kb, bb, t, g, rmask, s, L, sq, sk, K, C, BC, BKI, RS)
        if HAS_GV:
            bv_t, ref, f = _gv_rows(bvb, t, rmask, s, L, vv, sv, V, BC)
            acc = acc * tl.exp2(bv_t) + _gv_intra_o(A, vb, bvb, t, rmask, s, L, vv, sv, V, C, BC)
        else:
            acc += tl.dot(A.to(v_c.dtype), v_c)
        tl.store(ob + t[:, None] * so + g[:, None] * V + vv[None, :], (acc * scale).to(o.dtype.element_ty),
                 mask=rmask[:, None] & vm[None, :])


@triton.jit(do_not_specialize=["Hkv"])
def chunk_fwd_o_fast_kernel(q, k, v, b, bv, h, o, table, cu, scale, Hkv, K: tl.constexpr, V: tl.constexpr,
                            G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr, RB: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, BVF: tl.constexpr, FAST_SPAN: tl.constexpr,
                            HAS_GV: tl.constexpr):
    """o for one (chunk, kv-head, V-block) whose decay spans allow one reference for the whole chunk. With HAS_GV
    the value side gets its own one-reference frame: intra = 2^(bv_t - mv) * (A @ (v * 2^(mv - bv)))."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_bounds(table, cu, i_c, C)
    sq, sk, sv, so = Hkv * G * K, Hkv * K, Hkv * V, Hkv * G * V
    bb = b + (t0 * Hkv + i_h) * K
    if _frames(b, bv, t0, i_h, L, Hkv, K, V, BK, BVF, FAST_SPAN, HAS_GV):
        qb = q + (t0 * Hkv * G + i_h * G) * K
        ob = o + (t0 * Hkv * G + i_h * G) * V
        kk = tl.arange(0, BK)
        j = tl.arange(0, C)
        vv = i_v * BV + tl.arange(0, BV)
        vm = vv < V
        m, last, k_c, b_c, k_hat = _frame_keys(k + (t0 * Hkv + i_h) * K, bb, L, kk, sk, K, C)
        v_c = tl.load(v + (t0 * Hkv + i_h) * V + j[:, None] * sv + vv[None, :], mask=(j[:, None] < L) & vm[None, :],
                      other=0.0)
        h_t = tl.load(h + (i_c.to(tl.int64) * Hkv + i_h) * (K * V) + kk[:, None] * V + vv[None, :],
                      mask=(kk[:, None] < K) & vm[None, :], other=0.0)
        if HAS_GV:
            bvb = bv + (t0 * Hkv + i_h) * V
            mv, bv_last, v32, bv_c, v_hat = _frame_keys(v + (t0 * Hkv + i_h) * V, bvb, L, vv, sv, V, C)
        for s in range(0, tl.cdiv(L, RB)):
            t, g, rmask, q_s, b_s, f_q = _frame_rows(qb, bb, s, L, m, kk, sq, sk, K, G, GP, RB)
            A = tl.dot(q_s * f_q, tl.trans(k_hat))
            A = tl.where(j[None, :] <= t[:, None], A, 0.0)
            acc = tl.dot((q_s * tl.exp2(b_s)).to(h_t.dtype), h_t)
            if HAS_GV:
                bv_s, f_v = _frame_vrows(bvb, t, rmask, mv, vv, sv, V)
                # fp32 operands: v_hat reaches 2^(FAST_SPAN/2), past fp16's range
                acc = acc * tl.exp2(bv_s) + tl.dot(A, v_hat) * f_v
            else:
                acc += tl.dot(A.to(v_c.dtype), v_c)
            tl.store(ob + t[:, None] * so + g[:, None] * V + vv[None, :], (acc * scale).to(o.dtype.element_ty),
                     mask=rmask[:, None] & vm[None, :])


@triton.jit(do_not_specialize=["Hkv", "NW"])
def chunk_fwd_o_kernel(q, k, v, b, bv, h, o, table, cu, count, work, NW, scale, Hkv, K: tl.constexpr,
                       V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                       BKI: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, SPAN_MAX: tl.constexpr,
                       HAS_GV: tl.constexpr):
    """o for the work-listed chunks, by row sub-chunk (NW programs per V-block walk the list)."""
    i_w, i_v = tl.program_id(0), tl.program_id(2)
    for it in range(i_w, tl.load(count), NW):
        item = tl.load(work + it)
        _fwd_o_sub_chunks(item // Hkv, item % Hkv, i_v, q, k, v, b, bv, h, o, table, cu, scale, Hkv, K, V, G, GP, C,
                          BC, BKI, BKF, BV, SPAN_MAX, HAS_GV)


def chunk_gla_fwd(q: Tensor, k: Tensor, v: Tensor, gk: Tensor, gv: Tensor | None, scale: float, h0: Tensor | None,
                  want_ht: bool, cu_seqlens: Tensor | None
                  ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor]:
    """Forward on contiguous ``[B, T, H, D]`` inputs of one dtype; gv ``[B, T, Hkv, V]`` or None.

    Returns o (v's dtype), the final state (or None), and what the backward can reuse: the cumulated decays b
    ``[1, B*T, Hkv, K]`` and bv ``[1, B*T, Hkv, V]`` (or None), fp32, and the chunk states ``[S, Hkv, K, V]``.
    """
    B, T, Hq, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    G = Hq // Hkv
    GP, BC = sub_rows(G)
    cu, table, offsets, N, slots = prepare_chunks(cu_seqlens, B, T, q.device)
    flat = (lambda x: x.reshape(1, B * T, *x.shape[2:]))
    b = chunk_local_cumsum(flat(gk), table, cu, LOG2E, False, torch.float32)
    bv = chunk_local_cumsum(flat(gv), table, cu, LOG2E, False, torch.float32) if gv is not None else None
    h, ht = chunk_states(k, v, b, bv, h0, want_ht, 1.0, table, cu, offsets, N, False, v.dtype)
    o = torch.empty(B, T, Hq, V, device=q.device, dtype=v.dtype)
    BKF = p2(K)
    BV = min(cc.CONFIG["bv_fo"], p2(V))
    common = dict(K=K, V=V, G=G, GP=GP, C=CHUNK, FAST_SPAN=cc.FAST_SPAN, HAS_GV=bv is not None)
    chunk_fwd_o_fast_kernel[(slots, Hkv, triton.cdiv(V, BV))](q, k, v, b, bv if bv is not None else b, h, o, table,
                                                              cu, scale, Hkv, RB=64 // GP, BK=BKF, BV=BV,
                                                              BVF=p2(V), num_warps=cc.CONFIG["warps_fo"],
                                                              num_stages=cc.CONFIG["stages_fo"], **common)
    count, work, NW = work_list(b, table, cu, bv)
    BV = min(cc.CONFIG["bv_o"], p2(V))
    chunk_fwd_o_kernel[(NW, 1, triton.cdiv(V, BV))](q, k, v, b, bv if bv is not None else b, h, o, table, cu, count,
                                                    work, NW, scale, Hkv, K=K, V=V, G=G, GP=GP, C=CHUNK, BC=BC,
                                                    BKI=min(cc.CONFIG["bki"], BKF), BKF=BKF, BV=BV,
                                                    SPAN_MAX=cc.SPAN_MAX, HAS_GV=bv is not None,
                                                    num_warps=cc.CONFIG["warps_o"], num_stages=1)
    return o, ht, b, bv, h
