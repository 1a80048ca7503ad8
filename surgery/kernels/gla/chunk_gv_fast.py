"""Value-side gates on the one-reference path: dv and the gradient of the cumulated value decay.

A chunk whose key-side and value-side decay spans are both within FAST_SPAN uses one mid-chunk reference per side
(m for b, mv for bv), so every factor stays within 2^(+-FAST_SPAN/2):

    dv_s  = scale * 2^(mv - bv_s) * sum_t A_ts (do_t * 2^(bv_t - mv))  +  ((k_s * 2^(B - b_s)) @ dH) * 2^(Bv - bv_s)
    d/dbv = sum_g do * o - v * dv, plus at the chunk's last row sum_K(H * dH * 2^B) * 2^Bv + sum_s v_s * dv_inter_s

with o recomputed in fp32 from the same frames. The frame-scaled operands stay fp32 (up to 2^(FAST_SPAN/2) would
overflow fp16). The other chunks go to ``chunk_bwd_dv_gv_kernel`` (``chunk_gv``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from surgery.kernels.gla.chunk_common import _chunk_bounds
from surgery.kernels.gla.chunk_intra import _frame_keys, _frame_rows, _frame_vrows, _frames


@triton.jit(do_not_specialize=["Hkv"])
def chunk_bwd_dv_gv_fast_kernel(q, k, v, b, bv, h, do, dh, dv, dbv, table, cu, scale, Hkv, K: tl.constexpr,
                                V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr,
                                RB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BVF: tl.constexpr,
                                FAST_SPAN: tl.constexpr):
    """dv and d/dbv for one (chunk, kv-head, V-block) on the one-reference path, with value-side gates."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_bounds(table, cu, i_c, C)
    sq, sk, sv, so = Hkv * G * K, Hkv * K, Hkv * V, Hkv * G * V
    if _frames(b, bv, t0, i_h, L, Hkv, K, V, BK, BVF, FAST_SPAN, True):
        qb = q + (t0 * Hkv * G + i_h * G) * K
        dob = do + (t0 * Hkv * G + i_h * G) * V
        bb = b + (t0 * Hkv + i_h) * K
        bvb = bv + (t0 * Hkv + i_h) * V
        kk = tl.arange(0, BK)
        j = tl.arange(0, C)
        vv = i_v * BV + tl.arange(0, BV)
        vm = vv < V
        jv = (j[:, None] < L) & vm[None, :]
        m, last, k_c, b_c, k_hat = _frame_keys(k + (t0 * Hkv + i_h) * K, bb, L, kk, sk, K, C)
        mv, bv_last, v32, bv_c, v_hat = _frame_keys(v + (t0 * Hkv + i_h) * V, bvb, L, vv, sv, V, C)
        hv_off = (i_c.to(tl.int64) * Hkv + i_h) * (K * V) + kk[:, None] * V + vv[None, :]
        hm = (kk[:, None] < K) & vm[None, :]
        h_t = tl.load(h + hv_off, mask=hm, other=0.0)
        dh_t = tl.load(dh + hv_off, mask=hm, other=0.0)
        dt = h_t.dtype
        k_dec = k_c * tl.exp2(tl.where((j[:, None] < L) & (kk[None, :] < K), last[None, :] - b_c, 0.0))
        dvi = tl.dot(k_dec.to(dt), dh_t) * tl.exp2(tl.where(jv, bv_last[None, :] - bv_c, 0.0))
        acc = tl.zeros([C, BV], dtype=tl.float32)  # sum_t scale * A_ts do_t 2^(bv_t - mv), in the frame
        for s in range(0, tl.cdiv(L, RB)):
            t, g, rmask, q_s, b_s, f_q = _frame_rows(qb, bb, s, L, m, kk, sq, sk, K, G, GP, RB)
            A = tl.dot(q_s * f_q, tl.trans(k_hat))
            A = tl.where(j[None, :] <= t[:, None], A * scale, 0.0)
            do_s = tl.load(dob + t[:, None] * so + g[:, None] * V + vv[None, :], mask=rmask[:, None] & vm[None, :],
                           other=0.0).to(tl.float32)
            bv_s, f_v = _frame_vrows(bvb, t, rmask, mv, vv, sv, V)
            acc += tl.dot(tl.trans(A), do_s * f_v)
            o_s = tl.dot((q_s * tl.exp2(b_s)).to(dt), h_t) * tl.exp2(bv_s) * scale
            o_s += tl.dot(A, v_hat) * f_v
            # rows are (time, head): fold the group's heads into one row per time
            dov = tl.sum(tl.reshape(do_s * o_s, [RB, GP, BV]), axis=1)
            tq = s * RB + tl.arange(0, RB)
            tl.store(dbv + (t0 * Hkv + i_h) * V + tq[:, None] * sv + vv[None, :], dov,
                     mask=(tq[:, None] < L) & vm[None, :])
        dv_c = acc * tl.exp2(tl.where(jv, mv[None, :] - bv_c, 0.0)) + dvi
        tl.store(dv + (t0 * Hkv + i_h) * V + j[:, None] * sv + vv[None, :], dv_c.to(dv.dtype.element_ty), mask=jv)
        hdh = tl.sum(h_t.to(tl.float32) * dh_t.to(tl.float32) * tl.exp2(last)[:, None], axis=0)
        d_end = hdh * tl.exp2(bv_last) + tl.sum(v32 * dvi, axis=0)
        tl.debug_barrier()
        dbvb = dbv + (t0 * Hkv + i_h) * V + j[:, None] * sv + vv[None, :]
        g_c = tl.load(dbvb, mask=jv, other=0.0) - v32 * dv_c + tl.where(j[:, None] == L - 1, d_end[None, :], 0.0)
        tl.store(dbvb, g_c, mask=jv)
