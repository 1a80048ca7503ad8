"""Shared pieces of the chunked GLA kernels: settings, the chunk table, chunk-local cumsums and the state pass.

The state pass turns every chunk's own contribution into the state before it (forward) or the state gradient after
it (backward): one parallel kernel for the contributions, then an elementwise scan over the chunks of a sequence.
``FAST_SPAN``, ``SPAN_MAX`` and ``CONFIG`` are read by the launchers at every call, so tests and the benchmark's
sweep may change them here.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK = 64
LOG2E = 1.4426950408889634
# Largest decay (log2 units) across a whole chunk for which it is computed with one reference (exponents within
# +-FAST_SPAN/2); other chunks go to the sub-chunk kernels. Tests set it to -1.0 to force the sub-chunk kernels.
FAST_SPAN = 96.0
# Largest decay (log2 units) across one sub-chunk for which its diagonal block is a tensor-core product; tests
# set it to -1.0 to force the elementwise path everywhere.
SPAN_MAX = 64.0
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
def chunk_state_update_kernel(x, y, b, bv, out, table, cu, scale, Hkv, K: tl.constexpr, V: tl.constexpr,
                              G: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                              BWD: tl.constexpr, HAS_GV: tl.constexpr):
    """Each chunk's own contribution to the state recurrence, all chunks in parallel, written to out[chunk].

    Forward (x = k, y = v): U = sum_j (k_j * 2^(B - b_j))^T (v_j * 2^(Bv - bv_j)), so that
    H_{n+1} = 2^B 2^Bv * H_n + U. Backward (x = q, y = do): W = scale * sum_{g, t} (q_t * 2^b_t)^T (do_t * 2^bv_t),
    so that dH_n = 2^B 2^Bv * dH_{n+1} + W. bv (value-side cumulated decay) is only read when HAS_GV.
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
    if HAS_GV:
        bvb = bv + (t0 * Hkv + i_h) * V
        bv_t = tl.load(bvb + rows[:, None] * (Hkv * V) + vv[None, :], mask=y_mask, other=0.0)  # [C, BV]
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    if BWD:
        Hq = Hkv * G
        for g in range(0, G):
            x_t = tl.load(x + (t0 * Hq + i_h * G + g) * K + rows[None, :] * (Hq * K) + kk[:, None], mask=t_mask,
                          other=0.0)
            y_t = tl.load(y + (t0 * Hq + i_h * G + g) * V + rows[:, None] * (Hq * V) + vv[None, :], mask=y_mask,
                          other=0.0)
            if HAS_GV:
                y_t = (y_t * tl.exp2(bv_t)).to(y_t.dtype)
            acc += tl.dot((x_t * tl.exp2(b_t) * scale).to(y_t.dtype), y_t)
    else:
        b_last = tl.load(bb + (L - 1) * sk + kk, mask=(kk < K) & (L > 0), other=0.0)
        x_t = tl.load(x + (t0 * Hkv + i_h) * K + rows[None, :] * sk + kk[:, None], mask=t_mask, other=0.0)
        y_t = tl.load(y + (t0 * Hkv + i_h) * V + rows[:, None] * (Hkv * V) + vv[None, :], mask=y_mask, other=0.0)
        if HAS_GV:
            bv_last = tl.load(bvb + (L - 1) * (Hkv * V) + vv, mask=(vv < V) & (L > 0), other=0.0)
            y_t = (y_t * tl.exp2(tl.where(y_mask, bv_last[None, :] - bv_t, 0.0))).to(y_t.dtype)
        acc += tl.dot((x_t * tl.exp2(b_last[:, None] - b_t)).to(y_t.dtype), y_t)
    tl.store(out + (i_c.to(tl.int64) * Hkv + i_h) * (K * V) + kk[:, None] * V + vv[None, :],
             acc.to(out.dtype.element_ty), mask=(kk[:, None] < K) & (vv[None, :] < V) & (L > 0))


@triton.jit
def _scan_load(buf, b, bv, bos, eos, c0, nt, step, i_h, Hkv, kk, vv, kv_off, kv_mask, K: tl.constexpr,
               V: tl.constexpr, C: tl.constexpr, REVERSE: tl.constexpr, HAS_GV: tl.constexpr):
    """Chunk index, liveness, the exponents of the decays 2^B [BK] and 2^Bv [BV] (the latter only with HAS_GV) and
    the update [BK, BV] (fp32) for scan step `step`."""
    ok = step < nt
    if REVERSE:
        ci = nt - 1 - step
    else:
        ci = step
    ci = tl.where(ok, ci, 0)
    t_last = tl.minimum(bos + (ci + 1) * C, eos) - 1
    d = tl.load(b + (t_last * Hkv + i_h) * K + kk, mask=ok & (kk < K), other=0.0)
    if HAS_GV:
        dv = tl.load(bv + (t_last * Hkv + i_h) * V + vv, mask=ok & (vv < V), other=0.0)
    else:
        dv = d
    w = tl.load(buf + ((c0 + ci) * Hkv + i_h) * (K * V) + kv_off, mask=ok & kv_mask, other=0.0).to(tl.float32)
    return ci, ok, d, dv, w


@triton.jit
def _scan_step(S, buf, c0, ci, ok, d, dv, w, i_h, Hkv, kv_off, kv_mask, K: tl.constexpr, V: tl.constexpr,
               HAS_GV: tl.constexpr):
    """Write the running state into the chunk's slot (over its update), then advance it."""
    tl.store(buf + ((c0 + ci) * Hkv + i_h) * (K * V) + kv_off, S.to(buf.dtype.element_ty), mask=kv_mask & ok)
    if HAS_GV:
        S_next = S * tl.exp2(d)[:, None] * tl.exp2(dv)[None, :] + w
    else:
        S_next = S * tl.exp2(d)[:, None] + w
    return tl.where(ok, S_next, S)


@triton.jit(do_not_specialize=["Hkv"])
def chunk_state_scan_kernel(buf, b, bv, s0, s_end, cu, chunk_offsets, Hkv, K: tl.constexpr, V: tl.constexpr,
                            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
                            HAS_S0: tl.constexpr, STORE_END: tl.constexpr, HAS_GV: tl.constexpr):
    """Scan one sequence's chunks (backwards if REVERSE): buf[c] holds the chunk's update on entry and the state
    before it (forward) / the gradient after it (backward) on exit; S <- 2^B 2^Bv * S + update.

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
        c_a, ok_a, d_a, e_a, w_a = _scan_load(buf, b, bv, bos, eos, c0, nt, i0, i_h, Hkv, kk, vv, kv_off, kv_mask,
                                              K, V, C, REVERSE, HAS_GV)
        c_b, ok_b, d_b, e_b, w_b = _scan_load(buf, b, bv, bos, eos, c0, nt, i0 + 1, i_h, Hkv, kk, vv, kv_off,
                                              kv_mask, K, V, C, REVERSE, HAS_GV)
        c_c, ok_c, d_c, e_c, w_c = _scan_load(buf, b, bv, bos, eos, c0, nt, i0 + 2, i_h, Hkv, kk, vv, kv_off,
                                              kv_mask, K, V, C, REVERSE, HAS_GV)
        c_d, ok_d, d_d, e_d, w_d = _scan_load(buf, b, bv, bos, eos, c0, nt, i0 + 3, i_h, Hkv, kk, vv, kv_off,
                                              kv_mask, K, V, C, REVERSE, HAS_GV)
        S = _scan_step(S, buf, c0, c_a, ok_a, d_a, e_a, w_a, i_h, Hkv, kv_off, kv_mask, K, V, HAS_GV)
        S = _scan_step(S, buf, c0, c_b, ok_b, d_b, e_b, w_b, i_h, Hkv, kv_off, kv_mask, K, V, HAS_GV)
        S = _scan_step(S, buf, c0, c_c, ok_c, d_c, e_c, w_c, i_h, Hkv, kv_off, kv_mask, K, V, HAS_GV)
        S = _scan_step(S, buf, c0, c_d, ok_d, d_d, e_d, w_d, i_h, Hkv, kv_off, kv_mask, K, V, HAS_GV)
    if STORE_END:
        tl.store(s_end + (n * Hkv + i_h).to(tl.int64) * (K * V) + kv_off, S, mask=kv_mask)


def prepare_chunks(cu_seqlens: Tensor | None, B: int, T: int,
                   device: torch.device) -> tuple[Tensor, Tensor, Tensor, int, int]:
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


def sub_rows(G: int) -> tuple[int, int]:
    """(GP, BC): group padded to a power of two, and sub-chunk length so a row block has about 64 rows."""
    GP = triton.next_power_of_2(G)
    return GP, max(4, min(16, 64 // GP))


def p2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def chunk_local_cumsum(x: Tensor, table: Tensor, cu: Tensor, scale: float, reverse: bool,
                       out_dtype: torch.dtype) -> Tensor:
    """Chunk-local (reverse) cumsum of ``x`` ``[1, T, Hkv, K]`` times ``scale``, in ``out_dtype``."""
    _, T, Hkv, K = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    BK = min(64, p2(K))
    grid = (table.shape[0], Hkv, triton.cdiv(K, BK))
    chunk_local_cumsum_kernel[grid](x, y, table, cu, Hkv, K, scale, C=CHUNK, BK=BK, REVERSE=reverse, num_warps=4)
    return y


def chunk_states(x: Tensor, y: Tensor, b: Tensor, bv: Tensor | None, s0: Tensor | None, want_end: bool,
                 scale: float, table: Tensor, cu: Tensor, offsets: Tensor, N: int, bwd: bool,
                 out_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Per-chunk states: forward (x=k, y=v) the state before each chunk and the final state; backward (x=q, y=do,
    s0 = dL/d final state) dL/d(state after each chunk) and dL/d(initial state). ``b`` ``[1, T, Hkv, K]`` and
    ``bv`` ``[1, T, Hkv, V]`` (or None) are the chunk-local cumulated decays (log2). Returns ``[S, Hkv, K, V]``
    and the ``[N, Hkv, K, V]`` fp32 end state (or None)."""
    Hkv, K = b.shape[2], b.shape[3]
    V = y.shape[3]
    G = x.shape[2] // Hkv
    slots = table.shape[0]
    has_gv = bv is not None
    bv_arg = bv if has_gv else b  # never read without HAS_GV
    buf = torch.empty(slots, Hkv, K, V, device=b.device, dtype=out_dtype)
    end = torch.empty(N, Hkv, K, V, device=b.device, dtype=torch.float32) if want_end else None
    BK, BV = min(CONFIG["bk_u"], p2(K)), min(CONFIG["bv_u"], p2(V))
    grid = (slots, Hkv, triton.cdiv(K, BK) * triton.cdiv(V, BV))
    chunk_state_update_kernel[grid](x, y, b, bv_arg, buf, table, cu, scale, Hkv, K=K, V=V, G=G, C=CHUNK, BK=BK,
                                    BV=BV, BWD=bwd, HAS_GV=has_gv, num_warps=CONFIG["warps_u"])
    BK, BV = min(CONFIG["bk_s"], p2(K)), min(CONFIG["bv_s"], p2(V))
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), N * Hkv)
    chunk_state_scan_kernel[grid](buf, b, bv_arg, s0 if s0 is not None else buf, end if want_end else buf, cu,
                                  offsets, Hkv, K=K, V=V, C=CHUNK, BK=BK, BV=BV, REVERSE=bwd,
                                  HAS_S0=s0 is not None, STORE_END=want_end, HAS_GV=has_gv,
                                  num_warps=CONFIG["warps_s"])
    return buf, end


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
