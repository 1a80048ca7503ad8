"""Liger attention: a sliding-window softmax branch and a gated linear-recurrent branch on shared values, mixed.

``o = w_swa * SWA(q_rope, k_rope, v) + w_rec * GLA(q_feat, k_feat, v, gk)``; the specification is
``naive_liger_attention`` (``naive.py``).

Backends (``backend=``): ``"auto"`` (default) uses Triton (``fused.py``: the banded softmax kernel and the GLA chunk
kernel) for CUDA tensors when it loads and supports the call, and the PyTorch form (``torch_ops.py``: banded softmax
without ``[T, T]`` work, chunked GLA) otherwise; ``"torch"``; ``"triton"`` (CUDA, or ``TRITON_INTERPRET=1``; errors
are raised, never hidden by a fallback); ``"naive"`` (the specification).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

from torch import Tensor

from surgery.kernels.liger.naive import naive_liger_attention, naive_sliding_window_attention
from surgery.kernels.liger.torch_ops import (
    banded_sliding_window_attention,
    check_liger_inputs,
    torch_liger_attention,
)

__all__ = [
    "BACKENDS",
    "banded_sliding_window_attention",
    "liger_attention",
    "naive_liger_attention",
    "naive_sliding_window_attention",
    "torch_liger_attention",
]

BACKENDS = ("auto", "torch", "triton", "naive")

logger = logging.getLogger(__name__)

_warned: list[bool] = []


@functools.cache
def load_triton() -> tuple[Callable[..., tuple[Tensor, Tensor | None]] | None, str]:
    """``liger_attention_triton`` or ``(None, why)``; any import failure means "use the PyTorch form"."""
    try:
        return importlib.import_module("surgery.kernels.liger.fused").liger_attention_triton, ""
    except Exception as exc:  # noqa: BLE001 - Triton may be absent or unable to initialise; CPU runs must go on
        return None, f"{type(exc).__name__}: {exc}"


def liger_attention(
    q_rope: Tensor,
    k_rope: Tensor,
    q_feat: Tensor,
    k_feat: Tensor,
    v: Tensor,
    gk: Tensor,
    *,
    window: int,
    scale: float,
    softcap: float | None = None,
    w_swa: float = 0.5,
    w_rec: float = 0.5,
    rec_scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Liger attention, on the chosen backend.

    Args:
        q_rope: ``[B, T, Hq, D]`` post-RoPE queries (softmax branch).
        k_rope: ``[B, T, Hkv, D]`` post-RoPE keys (softmax branch); ``Hq % Hkv == 0``.
        q_feat: ``[B, T, Hq, D]`` feature-mapped queries (recurrent branch).
        k_feat: ``[B, T, Hkv, D]`` feature-mapped keys (recurrent branch).
        v: ``[B, T, Hkv, Dv]`` values of both branches.
        gk: ``[B, T, Hkv, D]`` key-side log decays (<= 0).
        window: previous tokens each query sees in the softmax branch besides itself (>= 0).
        scale: the softmax branch's score scale (the pretrained layer's).
        softcap: ``c`` of the soft cap ``c * tanh(s / c)`` on the softmax scores, or None.
        w_swa, w_rec: the branch weights (Liger: 0.5 and 0.5).
        rec_scale: multiplies the recurrent branch (Liger: 1).
        initial_state: ``[B, Hkv, D, Dv]`` recurrent state, or None.
        output_final_state: also return the recurrent state after the last token (fp32).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"naive"``.

    Returns:
        ``o`` ``[B, T, Hq, Dv]`` in v's dtype and the final state ``[B, Hkv, D, Dv]`` or None.

    Raises:
        ValueError: a shape, the window or ``backend`` is wrong.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_liger_inputs(q_rope, k_rope, q_feat, k_feat, v, gk, window, initial_state)
    args = (q_rope, k_rope, q_feat, k_feat, v, gk)
    kw = dict(window=window, scale=scale, softcap=softcap, w_swa=w_swa, w_rec=w_rec, rec_scale=rec_scale,
              initial_state=initial_state, output_final_state=output_final_state)
    if backend == "naive":
        return naive_liger_attention(*args, **kw)
    if backend == "torch" or (backend == "auto" and not q_rope.is_cuda):
        return torch_liger_attention(*args, **kw)
    fn, why = load_triton()
    if backend == "triton":
        if fn is None:
            raise RuntimeError(f"backend='triton': surgery.kernels.liger.fused could not be loaded ({why})")
        return fn(*args, **kw)
    if fn is None:
        if not _warned:  # once per process, not once per layer
            _warned.append(True)
            logger.warning("Triton liger_attention unavailable (%s); using the PyTorch form on %s", why,
                           q_rope.device)
        return torch_liger_attention(*args, **kw)
    try:
        return fn(*args, **kw)
    except NotImplementedError as exc:
        logger.debug("Triton liger_attention does not support this call (%s); using the PyTorch form", exc)
        return torch_liger_attention(*args, **kw)
