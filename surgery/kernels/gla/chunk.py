"""Chunked gated linear attention in Triton, with GQA-shared states: forward and backward.

The sequence is cut into chunks of ``CHUNK`` = 64 tokens. Per key/value head and chunk n, with ``b`` the
chunk-local inclusive cumsum of the log-decay (log2 units) and ``H_n`` the state before the chunk::

    o_t     = scale * ((q_t * 2^b_t) @ H_n + sum_{j<=t} (sum_k q_tk k_jk 2^(b_tk - b_jk)) v_j)
    H_{n+1} = 2^B * H_n + U_n,    U_n = sum_j (k_j * 2^(B - b_j))^T v_j          B = b at the chunk's last row

The Hq/Hkv query heads of a group read the same state and keys, so a program handles one (chunk, kv-head) and
stacks the group's query rows: row ``r`` of a tile is time ``r // GP`` and query head ``r % GP`` (GP = G rounded
up to a power of two). k, v and the gates are never repeated.

Pipeline (forward): chunk-local cumsum -> U_n for every chunk in parallel -> an elementwise scan over chunks that
turns them into the states H_n in place -> outputs. Backward recomputes b and H (unless SAVE_STATES), gets the
state gradients the same way in reverse, then dv and dq/dk/d(decay) per chunk; a reverse chunk-local cumsum turns
d(cumulated decay) into d(gate).

Numerical safety (the decays are <= 0, so ``b`` falls along a chunk). Intra-chunk scores need 2^(b_t - b_j):
- One-reference path (``*_fast_kernel``): a chunk whose decay span (max over key dims of b_first - b_last) is at
  most FAST_SPAN uses one reference m = (b_first + b_last) / 2, so q * 2^(b - m) and k * 2^(m - b) stay within
  2^(+-FAST_SPAN/2) - far from fp32/bf16 overflow and underflow - and the scores are one tensor-core product.
- Sub-chunk path (the exact fallback, for chunks with stronger decay): rows go in sub-chunks of BC tokens with the
  reference at the sub-chunk's first row, so every exponent is <= 0 except inside the diagonal block, which is a
  product while its own span is <= SPAN_MAX and an elementwise sum with exponents <= 0 past that. A tiny classify
  kernel lists these chunks on the device (no host sync) and the sub-chunk kernels walk the list.
The state recurrences only ever multiply by 2^(<= 0).

Kernels (fla's naming ladder, our own code): ``*_kernel`` -> ``chunk_gla_fwd`` / ``chunk_gla_bwd`` ->
``ChunkGLAFunction`` -> ``chunk_gla_triton``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from surgery.kernels.gla.torch_ops import check_gla_inputs

CHUNK = 64
LOG2E = 1.4426950408889634
# Largest decay (log2 units) across a whole chunk for which it is computed with one reference (exponents within
# +-FAST_SPAN/2); other chunks go to the sub-chunk kernels. Tests set it to -1.0 to force the sub-chunk kernels.
FAST_SPAN = 96.0
# Largest decay (log2 units) across one sub-chunk for which its diagonal block is a tensor-core product; tests
# set it to -1.0 to force the elementwise path everywhere.
SPAN_MAX = 64.0
# Keep b and the chunk states from the forward for the backward instead of recomputing them: saves one cumsum,
# one state update and one scan per backward (H200, Llama-3-8B shape, 32K tokens: fwd+bwd 4.17-4.36 ms -> 3.85-4.00
# ms, measured) for B*T*Hkv*K*(4 + 2V/64) bytes more activation memory (~0.27 GB per layer at 32K tokens).
# Set it to False to trade that time back for memory.
SAVE_STATES = True
# Launch settings, as chosen by benchmarks/kernels.py --sweep on an H200 (Triton 3.6). Read at every call.
CONFIG: dict[str, int] = {
    # one-reference (fast) kernels
    "bv_fo": 128, "warps_fo": 4, "stages_fo": 1, "bv_fdv": 128, "warps_fdv": 8, "stages_fdv": 1, "bk_fdq": 64,
    "warps_fdq": 8, "stages_fdq": 1,
    # sub-chunk (exact fallback) kernels
    "bki": 32, "bv_o": 128, "warps_o": 4, "bv_dv": 64, "warps_dv": 8, "bk_dqk": 32, "bvi_dqk": 32, "warps_dqk": 4,
    # state update (parallel) and scan (serial over chunks, elementwise)
    "bk_u": 64, "bv_u": 128, "warps_u": 8, "bk_s": 32, "bv_s": 32, "warps_s": 4,
}


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (kernels then see fp32 data only: env.md F4/F5)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _chunk_bounds(table, cu, i_c, C: tl.constexpr):
    """(first token, valid rows) of chunk slot i_c; slots past the last chunk get 0 rows."""
    n = tl.load(table + 2 * i_c)
    loc = tl.load(table + 2 * i_c + 1)
    n_safe = tl.maximum(n, 0)
    bos = tl.load(cu + n_safe).to(tl.int64)
    eos = tl.load(cu + n_safe + 1).to(tl.int64)
    t0 = bos + loc * C
    L = tl.where(n >= 0, tl.minimum(eos - t0, C), 0)
    return t0, L


@triton.jit(do_not_specialize=["Hkv"])
def chunk_local_cumsum_kernel(x, y, table, cu, Hkv, K, scale, C: tl.constexpr, BK: tl.constexpr,
                              REVERSE: tl.constexpr):
    """y = scale * cumsum of x within each chunk ([T, Hkv, K] -> same), forward or reverse, fp32 sums."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_bounds(table, cu, i_c, C)
    base = (t0 * Hkv + i_h) * K
    rows = tl.arange(0, C)
    cols = i_k * BK + tl.arange(0, BK)
    mask = (rows[:, None] < L) & (cols[None, :] < K)
    off = rows[:, None] * (Hkv * K) + cols[None, :]
    x_t = tl.load(x + base + off, mask=mask, other=0.0).to(tl.float32)
    y_t = tl.cumsum(x_t, axis=0, reverse=REVERSE) * scale
    tl.store(y + base + off, y_t.to(y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["Hkv"])
def chunk_state_update_kernel(x, y, b, out, table, cu, scale, Hkv, K: tl.constexpr, V: tl.constexpr,
                              G: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                              BWD: tl.constexpr):
    """Each chunk's own contribution to the state recurrence, all chunks in parallel, written to out[chunk].

    Forward (x = k, y = v): U = sum_j (k_j * 2^(B - b_j))^T v_j, so that H_{n+1} = 2^B * H_n + U.
    Backward (x = q, y = do): W = scale * sum_{g, t} (q_t * 2^b_t)^T do_t, so that dH_n = 2^B * dH_{n+1} + W.
    """
    i_c, i_h, i_kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_bounds(table, cu, i_c, C)
    NV: tl.constexpr = (V + BV - 1) // BV
    kk = (i_kv // NV) * BK + tl.arange(0, BK)
    vv = (i_kv % NV) * BV + tl.arange(0, BV)
    rows = tl.arange(0, C)
    sk = Hkv * K
    bb = b + (t0 * Hkv + i_h) * K
    t_mask = (kk[:, None] < K) & (rows[None, :] < L)
    y_mask = (rows[:, None] < L) & (vv[None, :] < V)
    b_t = tl.load(bb + rows[None, :] * sk + kk[:, None], mask=t_mask, other=0.0)  # [BK, C], transposed
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    if BWD:
        Hq = Hkv * G
        for g in range(0, G):
            x_t = tl.load(x + (t0 * Hq + i_h * G + g) * K + rows[None, :] * (Hq * K) + kk[:, None], mask=t_mask,
                          other=0.0)
            y_t = tl.load(y + (t0 * Hq + i_h * G + g) * V + rows[:, None] * (Hq * V) + vv[None, :], mask=y_mask,
                          other=0.0)
            acc += tl.dot((x_t * tl.exp2(b_t) * scale).to(y_t.dtype), y_t)
    else:
        b_last = tl.load(bb + (L - 1) * sk + kk, mask=(kk < K) & (L > 0), other=0.0)
        x_t = tl.load(x + (t0 * Hkv + i_h) * K + rows[None, :] * sk + kk[:, None], mask=t_mask, other=0.0)
        y_t = tl.load(y + (t0 * Hkv + i_h) * V + rows[:, None] * (Hkv * V) + vv[None, :], mask=y_mask, other=0.0)
        acc += tl.dot((x_t * tl.exp2(b_last[:, None] - b_t)).to(y_t.dtype), y_t)
    tl.store(out + (i_c.to(tl.int64) * Hkv + i_h) * (K * V) + kk[:, None] * V + vv[None, :],
             acc.to(out.dtype.element_ty), mask=(kk[:, None] < K) & (vv[None, :] < V) & (L > 0))


@triton.jit
def _scan_load(buf, b, bos, eos, c0, nt, step, i_h, Hkv, kk, kv_off, kv_mask, K: tl.constexpr, V: tl.constexpr,
               C: tl.constexpr, REVERSE: tl.constexpr):
    """Chunk index, liveness, decay 2^B's exponent [BK] and update [BK, BV] (fp32) for scan step `step`."""
    ok = step < nt
    if REVERSE:
        ci = nt - 1 - step
    else:
        ci = step
    ci = tl.where(ok, ci, 0)
    t_last = tl.minimum(bos + (ci + 1) * C, eos) - 1
    d = tl.load(b + (t_last * Hkv + i_h) * K + kk, mask=ok & (kk < K), other=0.0)
    w = tl.load(buf + ((c0 + ci) * Hkv + i_h) * (K * V) + kv_off, mask=ok & kv_mask, other=0.0).to(tl.float32)
    return ci, ok, d, w


@triton.jit
def _scan_step(S, buf, c0, ci, ok, d, w, i_h, Hkv, kv_off, kv_mask, K: tl.constexpr, V: tl.constexpr):
    """Write the running state into the chunk's slot (over its update), then advance it."""
    tl.store(buf + ((c0 + ci) * Hkv + i_h) * (K * V) + kv_off, S.to(buf.dtype.element_ty), mask=kv_mask & ok)
    return tl.where(ok, S * tl.exp2(d)[:, None] + w, S)


@triton.jit(do_not_specialize=["Hkv"])
def chunk_state_scan_kernel(buf, b, s0, s_end, cu, chunk_offsets, Hkv, K: tl.constexpr, V: tl.constexpr,
                            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
                            HAS_S0: tl.constexpr, STORE_END: tl.constexpr):
    """Scan one sequence's chunks (backwards if REVERSE): buf[c] holds the chunk's update on entry and the state
    before it (forward) / the gradient after it (backward) on exit; S <- 2^B * S + update.

    Elementwise, so the only serial dependency is one FMA per chunk. Steps go four at a time with the four loads
    issued first, which hides most of the memory latency that a one-at-a-time loop would wait for.
    """
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, i_h = i_nh // Hkv, i_nh % Hkv
    bos = tl.load(cu + n).to(tl.int64)
    eos = tl.load(cu + n + 1).to(tl.int64)
    c0 = tl.load(chunk_offsets + n).to(tl.int64)
    nt = tl.cdiv(eos - bos, C)
    kk = i_k * BK + tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    kv_mask = (kk[:, None] < K) & (vv[None, :] < V)
    kv_off = kk[:, None] * V + vv[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        S += tl.load(s0 + (n * Hkv + i_h).to(tl.int64) * (K * V) + kv_off, mask=kv_mask, other=0.0)
    for i0 in range(0, nt, 4):
        c_a, ok_a, d_a, w_a = _scan_load(buf, b, bos, eos, c0, nt, i0, i_h, Hkv, kk, kv_off, kv_mask, K, V, C, REVERSE)
        c_b, ok_b, d_b, w_b = _scan_load(buf, b, bos, eos, c0, nt, i0 + 1, i_h, Hkv, kk, kv_off, kv_mask, K, V, C,
                                         REVERSE)
        c_c, ok_c, d_c, w_c = _scan_load(buf, b, bos, eos, c0, nt, i0 + 2, i_h, Hkv, kk, kv_off, kv_mask, K, V, C,
                                         REVERSE)
        c_d, ok_d, d_d, w_d = _scan_load(buf, b, bos, eos, c0, nt, i0 + 3, i_h, Hkv, kk, kv_off, kv_mask, K, V, C,
                                         REVERSE)
        S = _scan_step(S, buf, c0, c_a, ok_a, d_a, w_a, i_h, Hkv, kv_off, kv_mask, K, V)
        S = _scan_step(S, buf, c0, c_b, ok_b, d_b, w_b, i_h, Hkv, kv_off, kv_mask, K, V)
        S = _scan_step(S, buf, c0, c_c, ok_c, d_c, w_c, i_h, Hkv, kv_off, kv_mask, K, V)
        S = _scan_step(S, buf, c0, c_d, ok_d, d_d, w_d, i_h, Hkv, kv_off, kv_mask, K, V)
    if STORE_END:
        tl.store(s_end + (n * Hkv + i_h).to(tl.int64) * (K * V) + kv_off, S, mask=kv_mask)


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
def _fwd_o_sub_chunks(i_c, i_h, i_v, q, k, v, b, h, o, table, cu, scale, Hkv, K: tl.constexpr, V: tl.constexpr,
                      G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BKI: tl.constexpr,
                      BKF: tl.constexpr, BV: tl.constexpr, SPAN_MAX: tl.constexpr):
    """o for one (chunk, kv-head, V-block): inter-chunk part from h plus intra-chunk scores, by row sub-chunk."""
    t0, L = _chunk_bounds(table, cu, i_c, C)
    Hq = Hkv * G
    RS: tl.constexpr = BC * GP
    sq, sk, sv, so = Hq * K, Hkv * K, Hkv * V, Hq * V
    qb = q + (t0 * Hq + i_h * G) * K
    kb = k + (t0 * Hkv + i_h) * K
    bb = b + (t0 * Hkv + i_h) * K
    hb = h + (i_c.to(tl.int64) * Hkv + i_h) * (K * V)
    ob = o + (t0 * Hq + i_h * G) * V
    j = tl.arange(0, C)
    vv = i_v * BV + tl.arange(0, BV)
    vm = vv < V
    v_c = tl.load(v + (t0 * Hkv + i_h) * V + j[:, None] * sv + vv[None, :], mask=(j[:, None] < L) & vm[None, :],
                  other=0.0)
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
        acc += tl.dot(A.to(v_c.dtype), v_c)
        tl.store(ob + t[:, None] * so + g[:, None] * V + vv[None, :], (acc * scale).to(o.dtype.element_ty),
                 mask=rmask[:, None] & vm[None, :])


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


@triton.jit
def _dqkg_sub_chunks(i_c, i_h, i_k, q, k, v, b, h, do, dh, dq, dk, dg, table, cu, scale, Hkv, K: tl.constexpr,
                     V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                     BK: tl.constexpr, BKF: tl.constexpr, BVI: tl.constexpr, SPAN_MAX: tl.constexpr):
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
            dA += tl.dot(do_s, tl.trans(v_c))
            dq_inter += tl.dot(do_s, tl.trans(h_kb))
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


@triton.jit(do_not_specialize=["Hkv"])
def chunk_fwd_o_fast_kernel(q, k, v, b, h, o, table, cu, scale, Hkv, K: tl.constexpr, V: tl.constexpr,
                            G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr, RB: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, FAST_SPAN: tl.constexpr):
    """o for one (chunk, kv-head, V-block) whose decay span allows one reference for the whole chunk."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_bounds(table, cu, i_c, C)
    sq, sk, sv, so = Hkv * G * K, Hkv * K, Hkv * V, Hkv * G * V
    bb = b + (t0 * Hkv + i_h) * K
    if _chunk_frame(bb, L, sk, K, BK, FAST_SPAN):
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
        for s in range(0, tl.cdiv(L, RB)):
            t, g, rmask, q_s, b_s, f_q = _frame_rows(qb, bb, s, L, m, kk, sq, sk, K, G, GP, RB)
            A = tl.dot(q_s * f_q, tl.trans(k_hat))
            A = tl.where(j[None, :] <= t[:, None], A, 0.0)
            acc = tl.dot((q_s * tl.exp2(b_s)).to(h_t.dtype), h_t)
            acc += tl.dot(A.to(v_c.dtype), v_c)
            tl.store(ob + t[:, None] * so + g[:, None] * V + vv[None, :], (acc * scale).to(o.dtype.element_ty),
                     mask=rmask[:, None] & vm[None, :])


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


@triton.jit(do_not_specialize=["Hkv"])
def chunk_bwd_dqkg_fast_kernel(q, k, v, b, h, do, dh, dq, dk, dg, table, cu, scale, Hkv, K: tl.constexpr,
                               V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr,
                               RB: tl.constexpr, BK: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
                               FAST_SPAN: tl.constexpr):
    """dq, dk and d/db for one (chunk, kv-head, K-block) on the one-reference path (see chunk_bwd_dqkg_kernel)."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L = _chunk_bounds(table, cu, i_c, C)
    sq, sk, sv, so = Hkv * G * K, Hkv * K, Hkv * V, Hkv * G * V
    bb = b + (t0 * Hkv + i_h) * K
    if _chunk_frame(bb, L, sk, K, BKF, FAST_SPAN):
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
        dk_acc = tl.zeros([C, BK], dtype=tl.float32)
        for s in range(0, tl.cdiv(L, RB)):
            t, g, rmask, q_s, b_s, f_q = _frame_rows(qb, bb, s, L, m, kk, sq, sk, K, G, GP, RB)
            do_s = tl.load(dob + t[:, None] * so + g[:, None] * V + vv[None, :], mask=rmask[:, None] & vm[None, :],
                           other=0.0)
            dA = tl.dot(do_s, tl.trans(v_c))
            dA = tl.where(j[None, :] <= t[:, None], dA * scale, 0.0)
            dq_s = tl.dot(dA, k_hat) * f_q + tl.dot(do_s, tl.trans(h_t)) * scale * tl.exp2(b_s)
            dk_acc += tl.dot(tl.trans(dA), q_s * f_q)
            tl.store(dq + (t0 * Hkv * G + i_h * G) * K + t[:, None] * sq + g[:, None] * K + kk[None, :],
                     dq_s.to(dq.dtype.element_ty), mask=rmask[:, None] & km[None, :])
            qdq = tl.sum(tl.reshape(q_s * dq_s, [RB, GP, BK]), axis=1)
            tq = s * RB + tl.arange(0, RB)
            tl.store(dg + (t0 * Hkv + i_h) * K + tq[:, None] * sk + kk[None, :], qdq,
                     mask=(tq[:, None] < L) & km[None, :])
        dh_t = tl.load(dh + hv_off, mask=km[:, None] & vm[None, :], other=0.0)
        dk_inter = tl.dot(v_c, tl.trans(dh_t)) * tl.exp2(tl.where(jk, last[None, :] - b_c, 0.0))
        dk_c = dk_acc * tl.exp2(tl.where(jk, m[None, :] - b_c, 0.0)) + dk_inter
        tl.store(dk + (t0 * Hkv + i_h) * K + j[:, None] * sk + kk[None, :], dk_c.to(dk.dtype.element_ty), mask=jk)
        d_end = tl.sum(h_t.to(tl.float32) * dh_t.to(tl.float32), axis=1) * tl.exp2(last) + tl.sum(k_c * dk_inter,
                                                                                                   axis=0)
        tl.debug_barrier()
        dgb = dg + (t0 * Hkv + i_h) * K + j[:, None] * sk + kk[None, :]
        g_c = tl.load(dgb, mask=jk, other=0.0) - k_c * dk_c + tl.where(j[:, None] == L - 1, d_end[None, :], 0.0)
        tl.store(dgb, g_c, mask=jk)


@triton.jit(do_not_specialize=["Hkv"])
def chunk_classify_kernel(b, table, cu, count, work, Hkv, K: tl.constexpr, C: tl.constexpr, BKF: tl.constexpr,
                          FAST_SPAN: tl.constexpr):
    """Append (chunk, kv-head) to the work list of the sub-chunk kernels when its decay span is too wide for one
    reference; the list's length ends in count[0]. Order is arbitrary, each item is written once."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    t0, L = _chunk_bounds(table, cu, i_c, C)
    slow = (~_chunk_frame(b + (t0 * Hkv + i_h) * K, L, Hkv * K, K, BKF, FAST_SPAN)) & (L > 0)
    idx = tl.atomic_add(count, 1, mask=slow)
    tl.store(work + idx, i_c * Hkv + i_h, mask=slow)


@triton.jit(do_not_specialize=["Hkv", "NW"])
def chunk_fwd_o_kernel(q, k, v, b, h, o, table, cu, count, work, NW, scale, Hkv, K: tl.constexpr,
                       V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                       BKI: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, SPAN_MAX: tl.constexpr):
    """o for the work-listed chunks, by row sub-chunk (NW programs per V-block walk the list)."""
    i_w, i_v = tl.program_id(0), tl.program_id(2)
    for it in range(i_w, tl.load(count), NW):
        item = tl.load(work + it)
        _fwd_o_sub_chunks(item // Hkv, item % Hkv, i_v, q, k, v, b, h, o, table, cu, scale, Hkv, K, V, G, GP, C, BC,
                          BKI, BKF, BV, SPAN_MAX)


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


@triton.jit(do_not_specialize=["Hkv", "NW"])
def chunk_bwd_dqkg_kernel(q, k, v, b, h, do, dh, dq, dk, dg, table, cu, count, work, NW, scale, Hkv,
                          K: tl.constexpr, V: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, C: tl.constexpr,
                          BC: tl.constexpr, BK: tl.constexpr, BKF: tl.constexpr, BVI: tl.constexpr,
                          SPAN_MAX: tl.constexpr):
    """dq, dk, d/db for the work-listed chunks, by row sub-chunk."""
    i_w, i_k = tl.program_id(0), tl.program_id(2)
    for it in range(i_w, tl.load(count), NW):
        item = tl.load(work + it)
        _dqkg_sub_chunks(item // Hkv, item % Hkv, i_k, q, k, v, b, h, do, dh, dq, dk, dg, table, cu, scale, Hkv, K, V,
                         G, GP, C, BC, BK, BKF, BVI, SPAN_MAX)


# ---------------------------------------------------------------------------------------------- launchers


def prepare_chunks(cu_seqlens: Tensor | None, B: int, T: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """Segment bounds and the chunk table, built on the device without a host sync.

    Returns cu ``[N + 1]`` int32, table ``[S, 2]`` int32 of (segment, chunk within it) per chunk slot (segment -1
    for slots past the last chunk: the slot count is an upper bound so no sync is needed), the first slot of each
    segment ``[N]`` int32, N and S.
    """
    if cu_seqlens is None:
        nt = triton.cdiv(T, CHUNK)
        cu = torch.arange(B + 1, device=device, dtype=torch.int32) * T
        idx = torch.arange(B * nt, device=device, dtype=torch.int32)
        table = torch.stack([idx // nt, idx % nt], 1).contiguous()
        return cu, table, torch.arange(B, device=device, dtype=torch.int32) * nt, B, B * nt
    cu = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    N = cu.numel() - 1
    nts = (cu[1:] - cu[:-1] + CHUNK - 1).div(CHUNK, rounding_mode="floor").long()
    ends = torch.cumsum(nts, 0)
    starts = ends - nts
    slots = triton.cdiv(T, CHUNK) + N
    slot = torch.arange(slots, device=device)
    seq = torch.searchsorted(ends, slot, right=True)
    valid = seq < N
    seq = seq.clamp(max=N - 1)
    loc = slot - starts[seq]
    table = torch.stack([torch.where(valid, seq, -1), torch.where(valid, loc, 0)], 1).to(torch.int32).contiguous()
    return cu, table, starts.to(torch.int32), N, slots


def _sub_rows(G: int) -> tuple[int, int]:
    """(GP, BC): group padded to a power of two, and sub-chunk length so a row block has about 64 rows."""
    GP = triton.next_power_of_2(G)
    return GP, max(4, min(16, 64 // GP))


def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def chunk_local_cumsum(x: Tensor, table: Tensor, cu: Tensor, scale: float, reverse: bool,
                       out_dtype: torch.dtype) -> Tensor:
    """Chunk-local (reverse) cumsum of ``x`` ``[1, T, Hkv, K]`` times ``scale``, in ``out_dtype``."""
    _, T, Hkv, K = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    BK = min(64, _p2(K))
    grid = (table.shape[0], Hkv, triton.cdiv(K, BK))
    chunk_local_cumsum_kernel[grid](x, y, table, cu, Hkv, K, scale, C=CHUNK, BK=BK, REVERSE=reverse, num_warps=4)
    return y


def chunk_states(x: Tensor, y: Tensor, b: Tensor, s0: Tensor | None, want_end: bool, scale: float, table: Tensor,
                 cu: Tensor, offsets: Tensor, N: int, bwd: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Per-chunk states: forward (x=k, y=v) the state before each chunk and the final state; backward (x=q, y=do,
    s0 = dL/d final state) dL/d(state after each chunk) and dL/d(initial state). Returns ``[S, Hkv, K, V]`` and
    the ``[N, Hkv, K, V]`` fp32 end state (or None)."""
    Hkv, K = b.shape[2], b.shape[3]
    V = y.shape[3]
    G = x.shape[2] // Hkv
    slots = table.shape[0]
    buf = torch.empty(slots, Hkv, K, V, device=b.device, dtype=out_dtype)
    end = torch.empty(N, Hkv, K, V, device=b.device, dtype=torch.float32) if want_end else None
    BK, BV = min(CONFIG["bk_u"], _p2(K)), min(CONFIG["bv_u"], _p2(V))
    grid = (slots, Hkv, triton.cdiv(K, BK) * triton.cdiv(V, BV))
    chunk_state_update_kernel[grid](x, y, b, buf, table, cu, scale, Hkv, K=K, V=V, G=G, C=CHUNK, BK=BK, BV=BV,
                                    BWD=bwd, num_warps=CONFIG["warps_u"])
    BK, BV = min(CONFIG["bk_s"], _p2(K)), min(CONFIG["bv_s"], _p2(V))
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), N * Hkv)
    chunk_state_scan_kernel[grid](buf, b, s0 if s0 is not None else buf, end if want_end else buf, cu, offsets, Hkv,
                                  K=K, V=V, C=CHUNK, BK=BK, BV=BV, REVERSE=bwd,
                                  HAS_S0=s0 is not None, STORE_END=want_end, num_warps=CONFIG["warps_s"])
    return buf, end


def _work_list(b: Tensor, table: Tensor, cu: Tensor) -> tuple[Tensor, Tensor, int]:
    """Device-side list of the (chunk, kv-head) pairs that need the sub-chunk kernels, its length, and how many
    programs walk it (no host sync: the list's length is read by the kernels)."""
    _, _, Hkv, K = b.shape
    slots = table.shape[0]
    count = torch.zeros(1, device=b.device, dtype=torch.int32)
    work = torch.empty(slots * Hkv, device=b.device, dtype=torch.int32)
    chunk_classify_kernel[(slots, Hkv)](b, table, cu, count, work, Hkv, K=K, C=CHUNK, BKF=_p2(K), FAST_SPAN=FAST_SPAN,
                                         num_warps=1)
    return count, work, max(1, min(slots * Hkv, 4 * _sm_count(b.device)))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def chunk_gla_fwd(q: Tensor, k: Tensor, v: Tensor, gk: Tensor, scale: float, h0: Tensor | None, want_ht: bool,
                  cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Forward on contiguous ``[B, T, H, D]`` inputs of one dtype.

    Returns o (v's dtype), the final state (or None), and the cumulated decays b ``[1, B*T, Hkv, K]`` fp32 and
    chunk states ``[S, Hkv, K, V]`` that the backward can reuse.
    """
    B, T, Hq, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    G = Hq // Hkv
    GP, BC = _sub_rows(G)
    cu, table, offsets, N, slots = prepare_chunks(cu_seqlens, B, T, q.device)
    flat = (lambda x: x.reshape(1, B * T, *x.shape[2:]))
    b = chunk_local_cumsum(flat(gk), table, cu, LOG2E, False, torch.float32)
    h, ht = chunk_states(k, v, b, h0, want_ht, 1.0, table, cu, offsets, N, False, v.dtype)
    o = torch.empty(B, T, Hq, V, device=q.device, dtype=v.dtype)
    BKF = _p2(K)
    BV = min(CONFIG["bv_fo"], _p2(V))
    common = dict(K=K, V=V, G=G, GP=GP, C=CHUNK, FAST_SPAN=FAST_SPAN)
    chunk_fwd_o_fast_kernel[(slots, Hkv, triton.cdiv(V, BV))](q, k, v, b, h, o, table, cu, scale, Hkv, RB=64 // GP,
                                                              BK=BKF, BV=BV, num_warps=CONFIG["warps_fo"],
                                                              num_stages=CONFIG["stages_fo"], **common)
    count, work, NW = _work_list(b, table, cu)
    BV = min(CONFIG["bv_o"], _p2(V))
    chunk_fwd_o_kernel[(NW, 1, triton.cdiv(V, BV))](q, k, v, b, h, o, table, cu, count, work, NW, scale, Hkv, K=K, V=V,
                                                    G=G, GP=GP, C=CHUNK, BC=BC, BKI=min(CONFIG["bki"], BKF), BKF=BKF,
                                                    BV=BV, SPAN_MAX=SPAN_MAX, num_warps=CONFIG["warps_o"],
                                                    num_stages=1)
    return o, ht, b, h


def chunk_gla_bwd(q: Tensor, k: Tensor, v: Tensor, gk: Tensor, scale: float, h0: Tensor | None,
                  cu_seqlens: Tensor | None, do: Tensor, dht: Tensor | None, b: Tensor | None = None,
                  h: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients (dq, dk, dv, dgk, dh0) for ``chunk_gla_fwd``; b and h are recomputed unless given."""
    B, T, Hq, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    G = Hq // Hkv
    GP, BC = _sub_rows(G)
    cu, table, offsets, N, slots = prepare_chunks(cu_seqlens, B, T, q.device)
    flat = (lambda x: x.reshape(1, B * T, *x.shape[2:]))
    if b is None or h is None:
        b = chunk_local_cumsum(flat(gk), table, cu, LOG2E, False, torch.float32)
        h, _ = chunk_states(k, v, b, h0, False, 1.0, table, cu, offsets, N, False, v.dtype)
    dh, dh0 = chunk_states(q, do, b, dht, h0 is not None, scale, table, cu, offsets, N, True, v.dtype)
    BKF, BVF = _p2(K), _p2(V)
    common = dict(K=K, V=V, G=G, GP=GP, C=CHUNK, FAST_SPAN=FAST_SPAN)
    dv = torch.empty_like(v)
    BV = min(CONFIG["bv_fdv"], BVF)
    chunk_bwd_dv_fast_kernel[(slots, Hkv, triton.cdiv(V, BV))](q, k, b, do, dh, dv, table, cu, scale, Hkv,
                                                               RB=64 // GP, BK=BKF, BV=BV,
                                                               num_stages=CONFIG["stages_fdv"],
                                                               num_warps=CONFIG["warps_fdv"], **common)
    count, work, NW = _work_list(b, table, cu)
    slow = dict(K=K, V=V, G=G, GP=GP, C=CHUNK, BC=BC, BKF=BKF, SPAN_MAX=SPAN_MAX, num_stages=1)
    BV = min(CONFIG["bv_dv"], BVF)
    chunk_bwd_dv_kernel[(NW, 1, triton.cdiv(V, BV))](q, k, b, do, dh, dv, table, cu, count, work, NW, scale, Hkv,
                                                     BKI=min(CONFIG["bki"], BKF), BV=BV,
                                                     num_warps=CONFIG["warps_dv"], **slow)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    db = torch.empty(B, T, Hkv, K, device=q.device, dtype=torch.float32)
    BK = min(CONFIG["bk_fdq"], BKF)
    chunk_bwd_dqkg_fast_kernel[(slots, Hkv, triton.cdiv(K, BK))](q, k, v, b, h, do, dh, dq, dk, db, table, cu,
                                                                 scale, Hkv, RB=64 // GP, BK=BK, BKF=BKF, BV=BVF,
                                                                 num_warps=CONFIG["warps_fdq"],
                                                                 num_stages=CONFIG["stages_fdq"], **common)
    BK = min(CONFIG["bk_dqk"], BKF)
    chunk_bwd_dqkg_kernel[(NW, 1, triton.cdiv(K, BK))](q, k, v, b, h, do, dh, dq, dk, db, table, cu, count, work, NW,
                                                       scale, Hkv, BK=BK, BVI=min(CONFIG["bvi_dqk"], BVF),
                                                       num_warps=CONFIG["warps_dqk"], **slow)
    dg = chunk_local_cumsum(flat(db), table, cu, 1.0, True, gk.dtype).view_as(gk)
    return dq, dk, dv, dg, dh0


# ------------------------------------------------------------------------------------------------ autograd


class ChunkGLAFunction(torch.autograd.Function):
    """Autograd wrapper: saves the inputs (plus b and the chunk states when SAVE_STATES)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, gk: Tensor, scale: float, h0: Tensor | None,  # noqa: ANN001
                output_final_state: bool, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor | None]:
        o, ht, b, h = chunk_gla_fwd(q, k, v, gk, scale, h0, output_final_state, cu_seqlens)
        keep = (b, h) if SAVE_STATES else (None, None)
        ctx.save_for_backward(q, k, v, gk, h0, cu_seqlens, *keep)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do: Tensor, dht: Tensor | None):  # noqa: ANN001, ANN205
        q, k, v, gk, h0, cu_seqlens, b, h = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = chunk_gla_bwd(q, k, v, gk, ctx.scale, h0, cu_seqlens, do.contiguous(),
                                            dht.contiguous() if dht is not None else None, b, h)
        return dq, dk, dv, dg, None, dh0, None, None


def check_inputs(q: Tensor, k: Tensor, v: Tensor, gk: Tensor | None, gv: Tensor | None, initial_state: Tensor | None,
                 cu_seqlens: Tensor | None, where: str) -> None:
    """The shape checks of the torch forms (``check_gla_inputs``), with the Triton entry point named in the error."""
    try:
        check_gla_inputs(q, k, v, gk, gv, initial_state, cu_seqlens)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def chunk_gla_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None,
    gv: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked GLA (see ``naive_recurrent_gla`` for the semantics), differentiable in q, k, v, gk, initial_state.

    Args:
        q: ``[B, T, Hq, K]``.
        k: ``[B, T, Hkv, K]``; Hq % Hkv == 0; K <= 256 (else NotImplementedError).
        v: ``[B, T, Hkv, V]``; V <= 256 (else NotImplementedError).
        gk: ``[B, T, Hkv, K]`` log decays (<= 0), or None for no decay.
        gv: must be None (value-side gates are not implemented in the chunked kernels).
        scale: multiplies the output.
        initial_state: ``[N, Hkv, K, V]``, used in fp32.
        output_final_state: also return the final states.
        cu_seqlens: ``[N + 1]`` segment bounds (B == 1); empty segments allowed.

    Returns:
        o ``[B, T, Hq, V]`` in v's dtype and the final state ``[N, Hkv, K, V]`` fp32 (or None).
    """
    check_inputs(q, k, v, gk, gv, initial_state, cu_seqlens, "chunk_gla_triton")
    if gv is not None:
        raise NotImplementedError("chunk_gla_triton: value-side gates (gv) are not implemented; use "
                                  "fused_recurrent_gla_triton or the torch chunked form")
    if max(q.shape[3], v.shape[3]) > 256:  # an unsupported size, not a bad input: the dispatcher falls back
        raise NotImplementedError(f"chunk_gla_triton: K and V must be <= 256, got K={q.shape[3]}, V={v.shape[3]}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"chunk_gla_triton: needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    out_dtype = v.dtype
    # One compute dtype for q, k, v; the interpreter multiplies bf16 dots wrongly (env.md F4), so it gets fp32.
    dtype = torch.float32 if interpreting() else v.dtype
    q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))
    gk = torch.zeros_like(k) if gk is None else gk.contiguous()
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    o, ht = ChunkGLAFunction.apply(q, k, v, gk, float(scale), h0, bool(output_final_state), cu_seqlens)
    return o.to(out_dtype), ht
