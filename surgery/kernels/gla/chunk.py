"""Chunked gated linear attention in Triton, with GQA-shared states: forward and backward.

The sequence is cut into chunks of ``CHUNK`` = 64 tokens. Per key/value head and chunk n, with ``b`` the
chunk-local inclusive cumsum of the log-decay (log2 units) and ``H_n`` the state before the chunk::

    o_t     = scale * ((q_t * 2^b_t) @ H_n + sum_{j<=t} (sum_k q_tk k_jk 2^(b_tk - b_jk)) v_j)
    H_{n+1} = 2^B * H_n + U_n,    U_n = sum_j (k_j * 2^(B - b_j))^T v_j          B = b at the chunk's last row

The Hq/Hkv query heads of a group read the same state and keys, so a program handles one (chunk, kv-head) and
stacks the group's query rows: row ``r`` of a tile is time ``r // GP`` and query head ``r % GP`` (GP = G rounded
up to a power of two). k, v and the gates are never repeated.

Pipeline (forward): chunk-local cumsum -> U_n for every chunk in parallel -> an elementwise scan over chunks that
turns them into the states H_n in place -> outputs. Backward recomputes b and H (unless save_states), gets the
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
``ChunkGLAFunction`` -> ``chunk_gla_triton``. Files: ``chunk_common.py`` (settings, chunk table, cumsum, state
pass), ``chunk_intra.py`` (intra-chunk device functions, classifier), ``chunk_fwd.py``, ``chunk_bwd.py``,
``chunk_gv.py`` and ``chunk_gv_fast.py`` (value-side gates: each side gets its own frame), and this module
(autograd and the entry point).
"""

from __future__ import annotations

import torch
from torch import Tensor

from surgery.kernels import saves_are_transient
from surgery.kernels.gla.chunk_bwd import chunk_gla_bwd
from surgery.kernels.gla.chunk_common import CONFIG, interpreting
from surgery.kernels.gla.chunk_fwd import chunk_gla_fwd
from surgery.kernels.gla.torch_ops import check_gla_inputs

__all__ = ["CONFIG", "ChunkGLAFunction", "check_inputs", "chunk_gla_triton", "interpreting"]

# ------------------------------------------------------------------------------------------------ autograd


class ChunkGLAFunction(torch.autograd.Function):
    """Autograd wrapper: saves the inputs, plus the cumulated decays and the chunk states when ``save_states``."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, gk: Tensor, gv: Tensor | None, scale: float,  # noqa: ANN001
                h0: Tensor | None, output_final_state: bool, cu_seqlens: Tensor | None,
                save_states: bool) -> tuple[Tensor, Tensor | None]:
        o, ht, b, bv, h = chunk_gla_fwd(q, k, v, gk, gv, scale, h0, output_final_state, cu_seqlens)
        keep = (b, bv, h) if save_states else (None, None, None)
        ctx.save_for_backward(q, k, v, gk, gv, h0, cu_seqlens, *keep)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do: Tensor, dht: Tensor | None):  # noqa: ANN001, ANN205
        q, k, v, gk, gv, h0, cu_seqlens, b, bv, h = ctx.saved_tensors
        dq, dk, dv, dg, dgv, dh0 = chunk_gla_bwd(q, k, v, gk, gv, ctx.scale, h0, cu_seqlens, do.contiguous(),
                                                 dht.contiguous() if dht is not None else None, b, bv, h)
        return dq, dk, dv, dg, dgv, None, dh0, None, None, None


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
    *,
    save_states: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Chunked GLA (see ``naive_recurrent_gla`` for the semantics), differentiable in every tensor input.

    Args:
        q: ``[B, T, Hq, K]``.
        k: ``[B, T, Hkv, K]``; Hq % Hkv == 0; K <= 256 (else NotImplementedError).
        v: ``[B, T, Hkv, V]``; V <= 256 (else NotImplementedError).
        gk: ``[B, T, Hkv, K]`` log decays (<= 0), or None for no decay.
        gv: ``[B, T, Hkv, V]`` value-side log decays (<= 0), or None (``chunk_gv.py``, ``chunk_gv_fast.py``).
        scale: multiplies the output.
        initial_state: ``[N, Hkv, K, V]``, used in fp32.
        output_final_state: also return the final states.
        cu_seqlens: ``[N + 1]`` segment bounds (B == 1); empty segments allowed.
        save_states: keep the cumulated decays (fp32, ``[B, T, Hkv, K (+ V)]``) and the per-chunk states
            (``[B * T / 64, Hkv, K, V]`` in v's dtype) from the forward for the backward. False (the default)
            recomputes them there: one cumsum, one state update and one scan more per backward (on an H200 at the
            Llama-3-8B shape, 32K tokens, about 8% of fwd+bwd), for ``B*T*Hkv*K*(4 + 2V/64)`` bytes less
            activation memory per layer (about 0.27 GB at 32K tokens, bf16). ``benchmarks/kernels.py`` times both.
            Inside ``surgery.kernels.transient_saves()`` (a recomputed forward) they are always kept.

    Returns:
        o ``[B, T, Hq, V]`` in v's dtype and the final state ``[N, Hkv, K, V]`` fp32 (or None).
    """
    check_inputs(q, k, v, gk, gv, initial_state, cu_seqlens, "chunk_gla_triton")
    save_states = save_states or saves_are_transient()  # recomputed anyway: keeping them costs no memory for long
    if max(q.shape[3], v.shape[3]) > 256:  # an unsupported size, not a bad input: the dispatcher falls back
        raise NotImplementedError(f"chunk_gla_triton: K and V must be <= 256, got K={q.shape[3]}, V={v.shape[3]}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"chunk_gla_triton: needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    out_dtype = v.dtype
    # One compute dtype for q, k, v; the interpreter multiplies bf16 dots wrongly (env.md F4), so it gets fp32.
    dtype = torch.float32 if interpreting() else v.dtype
    q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))
    gk = torch.zeros_like(k) if gk is None else gk.contiguous()
    gv = gv.contiguous() if gv is not None else None
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    o, ht = ChunkGLAFunction.apply(q, k, v, gk, gv, float(scale), h0, bool(output_final_state), cu_seqlens,
                                   bool(save_states))
    return o.to(out_dtype), ht
