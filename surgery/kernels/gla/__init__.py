"""Gated linear attention (GLA): the public entry points, which pick a backend for each call.

Semantics, shapes and dtypes are those of :func:`naive_recurrent_gla` (``naive.py``): per key/value head,
``S_t = diag(e^{gk_t}) S_{t-1} diag(e^{gv_t}) + k_t^T v_t`` and ``o_t = scale * q_t S_t``, with GQA-shared states,
optional initial/final states and ``cu_seqlens`` packing.

Backends (``backend=``):

- ``"auto"`` (default): the Triton kernels for CUDA tensors when they load and support the call; otherwise, and
  always on CPU, the PyTorch forms (``torch_ops.py``). The Triton chunk kernel takes key- and value-side gates
  (GSA's two passes both run on it); when it raises ``NotImplementedError`` (K or V > 256) the call goes to the
  Triton fused-recurrent kernel, and only what neither Triton kernel supports falls back to PyTorch.
- ``"torch"``: the PyTorch forms (the CPU training path; autograd gives the gradients).
- ``"triton"``: the Triton kernels only. Needs CUDA tensors, or ``TRITON_INTERPRET=1`` (Triton's interpreter, slow,
  for tests). Any failure is raised, never hidden by a fallback.
- ``"naive"``: the token-by-token specification; slow, for checking.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable

from torch import Tensor

from surgery.kernels.gla.naive import naive_recurrent_gla
from surgery.kernels.gla.torch_ops import check_gla_inputs, torch_chunk_gla, torch_gla_state, torch_recurrent_gla

__all__ = [
    "BACKENDS",
    "chunk_gla",
    "fused_recurrent_gla",
    "naive_recurrent_gla",
    "torch_chunk_gla",
    "torch_gla_state",
    "torch_recurrent_gla",
]

BACKENDS = ("auto", "torch", "triton", "naive")

logger = logging.getLogger(__name__)

GlaResult = tuple[Tensor, Tensor | None]

_warned: set[str] = set()


@functools.cache
def load_triton(module: str, name: str) -> tuple[Callable[..., GlaResult] | None, str]:
    """Import ``surgery.kernels.gla.<module>.<name>`` once; return ``(function, "")`` or ``(None, why)``.

    Any exception counts as "not available": Triton may be absent, or present but unable to initialise
    (no driver, an incompatible build), and a CPU run must never crash because of it.
    """
    try:
        return getattr(importlib.import_module(f"surgery.kernels.gla.{module}"), name), ""
    except Exception as exc:  # noqa: BLE001 - see docstring: every import failure means "use another backend"
        return None, f"{type(exc).__name__}: {exc}"


def auto_uses_triton(q: Tensor) -> bool:
    """Whether ``backend="auto"`` tries Triton: CUDA tensors only (the interpreter is far too slow for real use)."""
    return q.is_cuda


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dispatch(
    which: str,
    backend: str,
    q: Tensor,
    args: tuple,
    torch_fn: Callable[..., GlaResult],
    triton_kwargs: dict | None = None,
) -> GlaResult:
    """Run one GLA call on the chosen backend; ``args`` are the nine positional arguments of the spec, and
    ``triton_kwargs`` go to the Triton function of ``which`` only."""
    kw = triton_kwargs or {}
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "naive":
        return naive_recurrent_gla(*args)
    if backend == "torch" or (backend == "auto" and not auto_uses_triton(q)):
        return torch_fn(*args)
    fn, why = load_triton(which, f"{which}_gla_triton")
    if backend == "triton":
        if fn is None:
            raise RuntimeError(f"backend='triton': surgery.kernels.gla.{which} could not be loaded ({why})")
        if not (q.is_cuda or _interpreting()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got q on {q.device} (set TRITON_INTERPRET=1 to use "
                "Triton's interpreter, or use backend='auto' or 'torch')"
            )
        return fn(*args, **kw)
    if fn is None:
        if which not in _warned:  # once per process: a slow fallback on GPU deserves one loud line, not one per layer
            _warned.add(which)
            logger.warning("Triton %s_gla unavailable (%s); using the PyTorch form on %s", which, why, q.device)
        return torch_fn(*args)
    try:
        return fn(*args, **kw)
    except NotImplementedError as exc:
        if which == "chunk":
            # The token-loop Triton kernel takes what the chunk kernel does not (K or V > 256): it keeps the call on
            # the GPU, with its own backward.
            step_fn, _ = load_triton("fused_recurrent", "fused_recurrent_gla_triton")
            if step_fn is not None:
                try:
                    return step_fn(*args)
                except NotImplementedError:
                    pass
        logger.debug("Triton %s_gla does not support this call (%s); using the PyTorch form", which, exc)
        return torch_fn(*args)


def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
    *,
    save_states: bool = False,
) -> GlaResult:
    """Gated linear attention in chunked parallel form: prefill and training.

    Args:
        q: ``[B, T, Hq, K]`` queries.
        k: ``[B, T, Hkv, K]`` keys; ``Hq % Hkv == 0`` (query head i reads state i // (Hq // Hkv)).
        v: ``[B, T, Hkv, V]`` values.
        gk: ``[B, T, Hkv, K]`` natural-log decay (<= 0) on the key side, or None.
        gv: ``[B, T, Hkv, V]`` natural-log decay (<= 0) on the value side, or None.
        scale: multiplies the output.
        initial_state: ``[N, Hkv, K, V]``; N = B, or the number of segments with ``cu_seqlens``.
        output_final_state: also return the state after each sequence/segment.
        cu_seqlens: ``[N + 1]`` int segment boundaries along T (B must be 1); empty segments are allowed.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"naive"`` (see the module docstring).
        save_states: Triton chunk kernel only: keep the per-chunk states from the forward for the backward
            (faster backward, more activation memory) instead of recomputing them (the default; see
            ``chunk_gla_triton``).

    Returns:
        ``o`` ``[B, T, Hq, V]`` in v's dtype, and the final state ``[N, Hkv, K, V]`` in fp32 (fp64 for fp64
        inputs), or None.

    Raises:
        ValueError: a shape, ``cu_seqlens`` or ``backend`` is wrong.
    """
    check_gla_inputs(q, k, v, gk, gv, initial_state, cu_seqlens)
    args = (q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens)
    return _dispatch("chunk", backend, q, args, torch_chunk_gla, {"save_states": save_states})


def fused_recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> GlaResult:
    """Gated linear attention token by token: decoding and short inputs (T of 1 to a few dozen).

    Same arguments, shapes and results as :func:`chunk_gla`; only the algorithm differs (one state update per
    token, state kept in fp32), which is cheaper than the chunked form when T is small.
    """
    check_gla_inputs(q, k, v, gk, gv, initial_state, cu_seqlens)
    args = (q, k, v, gk, gv, scale, initial_state, output_final_state, cu_seqlens)
    return _dispatch("fused_recurrent", backend, q, args, torch_recurrent_gla)
