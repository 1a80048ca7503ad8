"""Fused recurrent gated linear attention in Triton: one program walks the tokens of one sequence and kv-head.

The state ``S`` ``[K, BV]`` (one value block) lives in fp32 registers for the whole sequence::

    S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t^T v_t,     o_t = scale * q_t S_t   (each query head of the group)

It is the decode path (``fused_recurrent_gla_step_`` updates a state tensor in place, with no host sync and no
allocation but o, so it can be captured in a CUDA graph) and the short-sequence path. The backward runs two
passes: forward again for dq (and o * do when gv is given), then backwards in time for dk, dv, dh0 and the gate
gradients, which are reverse cumsums of ``q*dq - k*dk`` (``o*do - v*dv``) plus the final-state term
``sum(dht * S_T)``. dq, dk and dgk are summed over value blocks afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from surgery.kernels.gla.chunk import check_inputs, interpreting

CONFIG: dict[str, int] = {"bv": 32, "warps": 4, "bv_bwd": 32, "warps_bwd": 4}


@triton.jit
def _bounds(cu, n, T, VARLEN: tl.constexpr):
    if VARLEN:
        bos = tl.load(cu + n).to(tl.int64)
        eos = tl.load(cu + n + 1).to(tl.int64)
    else:
        bos = n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit(do_not_specialize=["T", "Hkv"])
def fused_recurrent_fwd_kernel(q, k, v, gk, gv, o, h0, ht, cu, scale, T, Hkv, K, V, G: tl.constexpr,
                               BK: tl.constexpr, BV: tl.constexpr, HAS_GK: tl.constexpr, HAS_GV: tl.constexpr,
                               HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, VARLEN: tl.constexpr):
    """One (value block, sequence * kv-head). h0 and ht may be the same tensor: each program reads its block
    before it writes it, so the update is in place."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    n, i_h = i_nh // Hkv, i_nh % Hkv
    bos, eos = _bounds(cu, n, T, VARLEN)
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    km, vm = kk < K, vv < V
    s_base = (n * Hkv + i_h).to(tl.int64) * K * V
    s_off = kk[:, None] * V + vv[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + s_base + s_off, mask=km[:, None] & vm[None, :], other=0.0)
    Hq = Hkv * G
    for t in range(bos, eos):
        k_t = tl.load(k + (t * Hkv + i_h) * K + kk, mask=km, other=0.0).to(tl.float32)
        v_t = tl.load(v + (t * Hkv + i_h) * V + vv, mask=vm, other=0.0).to(tl.float32)
        if HAS_GK:
            S = S * tl.exp(tl.load(gk + (t * Hkv + i_h) * K + kk, mask=km, other=0.0).to(tl.float32))[:, None]
        if HAS_GV:
            S = S * tl.exp(tl.load(gv + (t * Hkv + i_h) * V + vv, mask=vm, other=0.0).to(tl.float32))[None, :]
        S += k_t[:, None] * v_t[None, :]
        for g in tl.static_range(G):
            q_t = tl.load(q + (t * Hq + i_h * G + g) * K + kk, mask=km, other=0.0).to(tl.float32)
            o_t = tl.sum(q_t[:, None] * S, axis=0) * scale
            tl.store(o + (t * Hq + i_h * G + g) * V + vv, o_t.to(o.dtype.element_ty), mask=vm)
    if STORE_HT:
        tl.store(ht + s_base + s_off, S, mask=km[:, None] & vm[None, :])


@triton.jit(do_not_specialize=["T", "TT", "Hkv"])
def fused_recurrent_bwd_dq_kernel(q, k, v, gk, gv, do, dq, odo, h0, sT, cu, scale, T, TT, Hkv, K, V, G: tl.constexpr,
                                  BK: tl.constexpr, BV: tl.constexpr, HAS_GK: tl.constexpr, HAS_GV: tl.constexpr,
                                  HAS_H0: tl.constexpr, STORE_ST: tl.constexpr, VARLEN: tl.constexpr):
    """Forward in time again: dq per value block ([NV, T, Hq, K]), sum_g o*do if gv ([T, Hkv, V]), S_T."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    n, i_h = i_nh // Hkv, i_nh % Hkv
    bos, eos = _bounds(cu, n, T, VARLEN)
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    km, vm = kk < K, vv < V
    s_base = (n * Hkv + i_h).to(tl.int64) * K * V
    s_off = kk[:, None] * V + vv[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + s_base + s_off, mask=km[:, None] & vm[None, :], other=0.0)
    Hq = Hkv * G
    part = i_v.to(tl.int64) * TT * Hq * K  # this value block's slice of the [NV, ...] partial sums
    for t in range(bos, eos):
        k_t = tl.load(k + (t * Hkv + i_h) * K + kk, mask=km, other=0.0).to(tl.float32)
        v_t = tl.load(v + (t * Hkv + i_h) * V + vv, mask=vm, other=0.0).to(tl.float32)
        if HAS_GK:
            S = S * tl.exp(tl.load(gk + (t * Hkv + i_h) * K + kk, mask=km, other=0.0).to(tl.float32))[:, None]
        if HAS_GV:
            S = S * tl.exp(tl.load(gv + (t * Hkv + i_h) * V + vv, mask=vm, other=0.0).to(tl.float32))[None, :]
        S += k_t[:, None] * v_t[None, :]
        acc = tl.zeros([BV], dtype=tl.float32)
        for g in tl.static_range(G):
            do_t = tl.load(do + (t * Hq + i_h * G + g) * V + vv, mask=vm, other=0.0).to(tl.float32)
            dq_t = tl.sum(S * do_t[None, :], axis=1) * scale
            tl.store(dq + part + (t * Hq + i_h * G + g) * K + kk, dq_t, mask=km)
            if HAS_GV:
                q_t = tl.load(q + (t * Hq + i_h * G + g) * K + kk, mask=km, other=0.0).to(tl.float32)
                acc += tl.sum(q_t[:, None] * S, axis=0) * scale * do_t
        if HAS_GV:
            tl.store(odo + (t * Hkv + i_h) * V + vv, acc, mask=vm)
    if STORE_ST:
        tl.store(sT + s_base + s_off, S, mask=km[:, None] & vm[None, :])


@triton.jit(do_not_specialize=["T", "TT", "Hkv"])
def fused_recurrent_bwd_kernel(q, k, v, gk, gv, do, dq, odo, sT, dht, dk, dv, dgk, dgv, dh0, cu, scale, T, TT, Hkv, K, V,
                               G: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_GK: tl.constexpr,
                               HAS_GV: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                               VARLEN: tl.constexpr):
    """Backwards in time: dk and dgk per value block ([NV, T, Hkv, K]), dv, dgv ([T, Hkv, V]) and dh0."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    n, i_h = i_nh // Hkv, i_nh % Hkv
    bos, eos = _bounds(cu, n, T, VARLEN)
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    km, vm = kk < K, vv < V
    s_base = (n * Hkv + i_h).to(tl.int64) * K * V
    s_off = kk[:, None] * V + vv[None, :]
    Hq = Hkv * G
    part_q = i_v.to(tl.int64) * TT * Hq * K
    part_k = i_v.to(tl.int64) * TT * Hkv * K
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    acc_k = tl.zeros([BK], dtype=tl.float32)
    acc_v = tl.zeros([BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(dht + s_base + s_off, mask=km[:, None] & vm[None, :], other=0.0)
        s_T = tl.load(sT + s_base + s_off, mask=km[:, None] & vm[None, :], other=0.0)
        acc_k += tl.sum(dS * s_T, axis=1)  # d(final state)/d(last cumulated decay), shared by every token
        acc_v += tl.sum(dS * s_T, axis=0)
    for j in range(0, eos - bos):
        t = eos - 1 - j
        k_t = tl.load(k + (t * Hkv + i_h) * K + kk, mask=km, other=0.0).to(tl.float32)
        v_t = tl.load(v + (t * Hkv + i_h) * V + vv, mask=vm, other=0.0).to(tl.float32)
        for g in tl.static_range(G):
            q_t = tl.load(q + (t * Hq + i_h * G + g) * K + kk, mask=km, other=0.0).to(tl.float32)
            do_t = tl.load(do + (t * Hq + i_h * G + g) * V + vv, mask=vm, other=0.0).to(tl.float32)
            dS += (q_t * scale)[:, None] * do_t[None, :]
            if HAS_GK:
                dq_t = tl.load(dq + part_q + (t * Hq + i_h * G + g) * K + kk, mask=km, other=0.0)
                acc_k += q_t * dq_t
        dk_t = tl.sum(dS * v_t[None, :], axis=1)
        dv_t = tl.sum(dS * k_t[:, None], axis=0)
        tl.store(dk + part_k + (t * Hkv + i_h) * K + kk, dk_t, mask=km)
        tl.store(dv + (t * Hkv + i_h) * V + vv, dv_t.to(dv.dtype.element_ty), mask=vm)
        if HAS_GK:
            acc_k -= k_t * dk_t
            tl.store(dgk + part_k + (t * Hkv + i_h) * K + kk, acc_k, mask=km)
            dS = dS * tl.exp(tl.load(gk + (t * Hkv + i_h) * K + kk, mask=km, other=0.0).to(tl.float32))[:, None]
        if HAS_GV:
            acc_v += tl.load(odo + (t * Hkv + i_h) * V + vv, mask=vm, other=0.0) - v_t * dv_t
            tl.store(dgv + (t * Hkv + i_h) * V + vv, acc_v.to(dgv.dtype.element_ty), mask=vm)
            dS = dS * tl.exp(tl.load(gv + (t * Hkv + i_h) * V + vv, mask=vm, other=0.0).to(tl.float32))[None, :]
    if STORE_DH0:
        tl.store(dh0 + s_base + s_off, dS, mask=km[:, None] & vm[None, :])


# ---------------------------------------------------------------------------------------------- launchers


def _blocks(K: int, V: int, bv: int) -> tuple[int, int, int]:
    BK = max(16, triton.next_power_of_2(K))
    BV = min(bv, max(16, triton.next_power_of_2(V)))
    return BK, BV, triton.cdiv(V, BV)


def fused_recurrent_gla_fwd(q: Tensor, k: Tensor, v: Tensor, gk: Tensor | None, gv: Tensor | None, scale: float,
                            h0: Tensor | None, ht: Tensor | None, cu_seqlens: Tensor | None,
                            out: Tensor | None = None) -> Tensor:
    """Launch the forward on contiguous ``[B, T, H, D]`` inputs; writes ``ht`` (may be ``h0`` itself) if given."""
    B, T, Hq, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    o = out if out is not None else torch.empty(B, T, Hq, V, device=q.device, dtype=v.dtype)
    BK, BV, NV = _blocks(K, V, CONFIG["bv"])
    fused_recurrent_fwd_kernel[(NV, N * Hkv)](
        q, k, v, gk if gk is not None else k, gv if gv is not None else v, o, h0 if h0 is not None else o,
        ht if ht is not None else o, cu_seqlens if cu_seqlens is not None else o, scale, T, Hkv, K, V,
        G=Hq // Hkv, BK=BK, BV=BV, HAS_GK=gk is not None, HAS_GV=gv is not None, HAS_H0=h0 is not None,
        STORE_HT=ht is not None, VARLEN=cu_seqlens is not None, num_warps=CONFIG["warps"])
    return o


def fused_recurrent_gla_bwd(q: Tensor, k: Tensor, v: Tensor, gk: Tensor | None, gv: Tensor | None, scale: float,
                            h0: Tensor | None, cu_seqlens: Tensor | None, do: Tensor, dht: Tensor | None
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients (dq, dk, dv, dgk, dgv, dh0) of ``fused_recurrent_gla_fwd``."""
    B, T, Hq, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK, BV, NV = _blocks(K, V, CONFIG["bv_bwd"])
    f32 = {"device": q.device, "dtype": torch.float32}
    dq = torch.empty(NV, B, T, Hq, K, **f32)
    dk = torch.empty(NV, B, T, Hkv, K, **f32)
    dgk = torch.empty(NV, B, T, Hkv, K, **f32) if gk is not None else None
    odo = torch.empty(B, T, Hkv, V, **f32) if gv is not None else None
    sT = torch.empty(N, Hkv, K, V, **f32) if dht is not None else None
    dv = torch.empty_like(v)
    dgv = torch.empty(gv.shape, device=q.device, dtype=gv.dtype) if gv is not None else None
    dh0 = torch.empty(N, Hkv, K, V, **f32) if h0 is not None else None
    cu = cu_seqlens if cu_seqlens is not None else dq
    common = dict(G=Hq // Hkv, BK=BK, BV=BV, HAS_GK=gk is not None, HAS_GV=gv is not None,
                  VARLEN=cu_seqlens is not None, num_warps=CONFIG["warps_bwd"])
    any_ = dq  # stands in for absent tensors; never dereferenced behind a false flag
    fused_recurrent_bwd_dq_kernel[(NV, N * Hkv)](
        q, k, v, gk if gk is not None else any_, gv if gv is not None else any_, do, dq,
        odo if odo is not None else any_, h0 if h0 is not None else any_, sT if sT is not None else any_, cu, scale,
        T, B * T, Hkv, K, V, HAS_H0=h0 is not None, STORE_ST=sT is not None, **common)
    fused_recurrent_bwd_kernel[(NV, N * Hkv)](
        q, k, v, gk if gk is not None else any_, gv if gv is not None else any_, do, dq,
        odo if odo is not None else any_, sT if sT is not None else any_, dht if dht is not None else any_, dk, dv,
        dgk if dgk is not None else any_, dgv if dgv is not None else any_, dh0 if dh0 is not None else any_, cu,
        scale, T, B * T, Hkv, K, V, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, **common)
    dgk_out = dgk.sum(0).to(gk.dtype) if dgk is not None else None
    return dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv, dgk_out, dgv, dh0


class FusedRecurrentGLAFunction(torch.autograd.Function):
    """Autograd wrapper around the token-loop kernels; saves the inputs only."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, gk: Tensor | None, gv: Tensor | None, scale: float,  # noqa: ANN001
                h0: Tensor | None, output_final_state: bool, cu_seqlens: Tensor | None
                ) -> tuple[Tensor, Tensor | None]:
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        ht = (torch.empty(N, k.shape[2], k.shape[3], v.shape[3], device=q.device, dtype=torch.float32)
              if output_final_state else None)
        o = fused_recurrent_gla_fwd(q, k, v, gk, gv, scale, h0, ht, cu_seqlens)
        ctx.save_for_backward(q, k, v, gk, gv, h0, cu_seqlens)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do: Tensor, dht: Tensor | None):  # noqa: ANN001, ANN205
        q, k, v, gk, gv, h0, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, dgk, dgv, dh0 = fused_recurrent_gla_bwd(q, k, v, gk, gv, ctx.scale, h0, cu_seqlens,
                                                            do.contiguous(),
                                                            dht.contiguous() if dht is not None else None)
        return dq, dk, dv, dgk, dgv, None, dh0, None, None


def fused_recurrent_gla_triton(
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
    """GLA one token at a time in one kernel (see ``naive_recurrent_gla``); differentiable in every tensor input.

    Args:
        q: ``[B, T, Hq, K]``.
        k: ``[B, T, Hkv, K]``; Hq % Hkv == 0.
        v: ``[B, T, Hkv, V]``.
        gk: ``[B, T, Hkv, K]`` key-side log decays (<= 0), or None.
        gv: ``[B, T, Hkv, V]`` value-side log decays (<= 0), or None.
        scale: multiplies the output.
        initial_state: ``[N, Hkv, K, V]``, used in fp32.
        output_final_state: also return the final states.
        cu_seqlens: ``[N + 1]`` segment bounds (B == 1); empty segments allowed.

    Returns:
        o ``[B, T, Hq, V]`` in v's dtype and the final state ``[N, Hkv, K, V]`` fp32 (or None).
    """
    check_inputs(q, k, v, gk, gv, initial_state, cu_seqlens, "fused_recurrent_gla_triton")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"fused_recurrent_gla_triton: needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    out_dtype = v.dtype
    dtype = torch.float32 if interpreting() else v.dtype
    q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))
    gk = gk.contiguous() if gk is not None else None
    gv = gv.contiguous() if gv is not None else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous() if cu_seqlens is not None else None
    o, ht = FusedRecurrentGLAFunction.apply(q, k, v, gk, gv, float(scale), h0, bool(output_final_state), cu)
    return o.to(out_dtype), ht


def fused_recurrent_gla_step_(q: Tensor, k: Tensor, v: Tensor, gk: Tensor | None, state: Tensor,
                              scale: float = 1.0, gv: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """One decoding step for every sequence, updating ``state`` in place; safe under CUDA graph capture.

    No host sync, no allocation except the returned o (none when ``out`` is given). Not differentiable.

    Args:
        q: ``[B, Hq, K]`` or ``[B, 1, Hq, K]``.
        k: ``[B, Hkv, K]`` or ``[B, 1, Hkv, K]``.
        v: ``[B, Hkv, V]`` or ``[B, 1, Hkv, V]``.
        gk: like k, key-side log decay, or None.
        state: ``[B, Hkv, K, V]`` fp32, contiguous; overwritten with the new state.
        scale: multiplies the output.
        gv: like v, value-side log decay, or None.
        out: optional output buffer shaped like q with V in place of K, in v's dtype.

    Returns:
        o shaped like q with V in place of K, in v's dtype.
    """
    squeeze = q.dim() == 3
    q4, k4, v4 = (x.unsqueeze(1) if squeeze else x for x in (q, k, v))
    gk4 = gk.unsqueeze(1) if (gk is not None and squeeze) else gk
    gv4 = gv.unsqueeze(1) if (gv is not None and squeeze) else gv
    check_inputs(q4, k4, v4, gk4, gv4, state, None, "fused_recurrent_gla_step_")
    if q4.shape[1] != 1:
        raise ValueError(f"fused_recurrent_gla_step_: one token per sequence expected, got T={q4.shape[1]}")
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"fused_recurrent_gla_step_: state must be a contiguous fp32 tensor, got {state.dtype}, "
                         f"contiguous={state.is_contiguous()}")
    if interpreting() and v.dtype != torch.float32:
        raise ValueError("fused_recurrent_gla_step_: the Triton interpreter needs fp32 inputs (env.md F4)")
    q4, k4, v4 = (x.contiguous() for x in (q4, k4, v4))
    gk4 = gk4.contiguous() if gk4 is not None else None
    gv4 = gv4.contiguous() if gv4 is not None else None
    o_shape = (*q4.shape[:3], v4.shape[3])
    if out is not None and (out.shape not in (o_shape, (o_shape[0], *o_shape[2:])) or not out.is_contiguous()):
        raise ValueError(f"fused_recurrent_gla_step_: out must be contiguous with shape {o_shape}, got "
                         f"{tuple(out.shape)}")
    o = fused_recurrent_gla_fwd(q4, k4, v4, gk4, gv4, float(scale), state, state, None,
                                out=out.view(o_shape) if out is not None else None)
    return o.squeeze(1) if squeeze else o
