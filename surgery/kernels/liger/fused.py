"""Liger attention on Triton: the banded softmax kernel (``swa_triton``) and the chunked GLA kernel, mixed.

Not one fused kernel yet: the recurrent branch runs first through the GLA chunk kernels, with its weight folded
into the GLA scale (``w_rec * GLA(scale=s) = GLA(scale=w_rec * s)``); the softmax kernel then takes that output as
a residual and writes ``w_swa * SWA + rec`` in one pass per query block, summed in fp32 (no separate mixing pass;
its backward hands the incoming gradient to the recurrent branch unchanged). Fusing the window into the GLA output
kernel, which already loads the chunk's rows and values, is the next step.
"""

from __future__ import annotations

from torch import Tensor

from surgery.kernels.gla.chunk import chunk_gla_triton, interpreting
from surgery.kernels.liger.swa_triton import sliding_window_attention_triton
from surgery.kernels.liger.torch_ops import check_liger_inputs


def liger_attention_triton(
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
    save_states: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Liger attention on Triton; arguments, shapes and results as ``naive_liger_attention`` (``save_states``: see
    ``chunk_gla_triton``). Differentiable in every tensor input.

    Raises:
        NotImplementedError: a head dim over 256 (the dispatcher then uses the PyTorch form).
        ValueError: a shape or the window is wrong, or the tensors are not on CUDA (without the interpreter).
    """
    check_liger_inputs(q_rope, k_rope, q_feat, k_feat, v, gk, window, initial_state)
    if max(q_rope.shape[3], v.shape[3]) > 256:
        raise NotImplementedError(f"liger_attention_triton: head dims must be <= 256, got {q_rope.shape[3]}, "
                                  f"{v.shape[3]}")
    if q_rope.device.type != "cuda" and not interpreting():
        raise ValueError(f"liger_attention_triton: needs CUDA tensors (or TRITON_INTERPRET=1), got {q_rope.device}")
    out_dtype = v.dtype
    # the interpreter multiplies bf16 dots wrongly (env.md F4): it computes in fp32
    vv = v.float() if interpreting() else v
    qr, kr = (x.to(vv.dtype) for x in (q_rope, k_rope))
    rec, final = chunk_gla_triton(q_feat, k_feat, vv, gk, None, w_rec * rec_scale, initial_state,
                                  output_final_state, save_states=save_states)
    o = sliding_window_attention_triton(qr, kr, vv, window, scale, softcap, residual=rec, w_swa=w_swa)
    return o.to(out_dtype), final
