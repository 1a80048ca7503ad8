"""One decoding step of Liger's window branch over a static window, fused with the branch mix: one Triton launch.

For each sequence b and query head h (key/value head h // G), with the window ``K, V`` ``[W, D]`` (oldest first),
its validity ``ok`` ``[W]``, and this step's query, key and value (rotated rotate-half by ``cos``/``sin`` when given)::

    s_j = scale * q . K_j  (ok_j),   s_self = scale * q . k        (the query always sees itself)
    o   = w_swa * softmax([s, s_self]) . [V; v]  +  w_rec * rec     (rec: the recurrent branch's output)
    K, V <- [K_1 .. K_{W-1}, k], [V_1 .. V_{W-1}, v]                 (shifted in place: the window after this step)

In eager PyTorch this is about 25 launches per layer (RoPE of q and k, window concatenation, mask, SDPA, the window
written back, the mix); a captured decode step pays for each of them, and for the 32 layers of an 8B model they cost
more than the attention itself. The window's validity ``[B, W]`` is shared by a row's heads, so the caller shifts
it (one program per key/value head must not move what another still reads).

``window_decode_reference`` is the same step in PyTorch (the specification for the tests); ``window_decode`` runs the
kernel (CUDA, or the interpreter with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from surgery.sites.rotary import apply_rope

__all__ = ["window_decode", "window_decode_reference"]


def window_decode_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rec: Tensor,
    keys: Tensor,
    values: Tensor,
    valid: Tensor,
    scale: float,
    w_swa: float,
    w_rec: float,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
) -> Tensor:
    """The step in PyTorch; updates ``keys``/``values`` in place like the kernel.

    Args:
        q: ``[B, Hq, D]`` this step's queries (pre-RoPE when ``cos``/``sin`` are given, else already rotated).
        k: ``[B, Hkv, D]`` keys, likewise; v: ``[B, Hkv, Dv]`` values.
        rec: ``[B, Hq, Dv]`` the recurrent branch's output (fp32).
        keys: ``[B, Hkv, W, D]`` and values ``[B, Hkv, W, Dv]``: the window before this step, oldest first.
        valid: ``[B, W]`` bool, False for window slots that hold no real token.
        scale: the softmax scale; w_swa, w_rec: the branch weights.
        cos, sin: ``[B, D]`` rotate-half RoPE of this step's position, or None.

    Returns:
        ``[B, Hq, Dv]`` in q's dtype.
    """
    if cos is not None and sin is not None:
        q = apply_rope(q[:, :, None], cos[:, None], sin[:, None])[:, :, 0]
        k = apply_rope(k[:, :, None], cos[:, None], sin[:, None])[:, :, 0]
    B, Hq, D = q.shape
    G = Hq // k.shape[1]
    kk = torch.cat([keys, k[:, :, None]], 2).float().repeat_interleave(G, 1)  # [B, Hq, W + 1, D]
    vv = torch.cat([values, v[:, :, None]], 2).float().repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhjd->bhj", q.float(), kk) * scale
    ok = torch.cat([valid, valid.new_ones(B, 1)], 1).to(torch.bool)
    p = s.masked_fill(~ok[:, None], float("-inf")).softmax(-1)
    o = w_swa * torch.einsum("bhj,bhjd->bhd", p, vv) + w_rec * rec.float()
    keys.copy_(torch.cat([keys[:, :, 1:], k[:, :, None].to(keys.dtype)], 2))
    values.copy_(torch.cat([values[:, :, 1:], v[:, :, None].to(values.dtype)], 2))
    return o.to(q.dtype)


@triton.jit
def _rotated(X, offs, rd, D: tl.constexpr, md, cos, sin):
    """``x * cos + rotate_half(x) * sin`` of the row at ``X + offs``, in fp32 (``rotate_half``: ``[-x2, x1]``)."""
    x = tl.load(X + offs + rd, mask=md, other=0.0).to(tl.float32)
    half = D // 2
    partner = tl.where(rd < half, rd + half, rd - half)
    sign = tl.where(rd < half, -1.0, 1.0)
    xr = tl.load(X + offs + partner, mask=md, other=0.0).to(tl.float32) * sign
    return x * cos + xr * sin


@triton.jit
def _window_decode_kernel(
    Q, K, V, REC, KW, VW, VALID, COS, SIN, O,
    scale, w_swa, w_rec,
    HKV: tl.constexpr, G: tl.constexpr, W: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BW: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # one (sequence, key/value head); its G query heads in a loop
    b = pid // HKV
    rw, rd, rv = tl.arange(0, BW), tl.arange(0, BD), tl.arange(0, BDV)
    mw, md, mv = rw < W, rd < D, rv < DV
    kw = tl.load(KW + pid * W * D + rw[:, None] * D + rd[None, :], mask=mw[:, None] & md[None, :], other=0.0)
    vw = tl.load(VW + pid * W * DV + rw[:, None] * DV + rv[None, :], mask=mw[:, None] & mv[None, :], other=0.0)
    ok = (tl.load(VALID + b * W + rw, mask=mw, other=0) != 0) & mw
    if ROPE:
        cos = tl.load(COS + b * D + rd, mask=md, other=0.0).to(tl.float32)
        sin = tl.load(SIN + b * D + rd, mask=md, other=0.0).to(tl.float32)
        k = _rotated(K, pid * D, rd, D, md, cos, sin)
    else:
        cos, sin = 0.0, 0.0
        k = tl.load(K + pid * D + rd, mask=md, other=0.0).to(tl.float32)
    k = k.to(KW.dtype.element_ty)  # rounded as the window stores it, so this step and later ones read one key
    v = tl.load(V + pid * DV + rv, mask=mv, other=0.0)
    for g in range(G):
        row = pid * G + g  # b * Hq + h
        if ROPE:
            q = _rotated(Q, row * D, rd, D, md, cos, sin)
        else:
            q = tl.load(Q + row * D + rd, mask=md, other=0.0).to(tl.float32)
        q = q.to(Q.dtype.element_ty).to(tl.float32)  # rounded like the stored key, as the unfused path rounds it
        s = tl.sum(kw.to(tl.float32) * q[None, :], 1) * scale
        s = tl.where(ok, s, float("-inf"))
        s_self = tl.sum(k.to(tl.float32) * q, 0) * scale
        m = tl.maximum(tl.max(s, 0), s_self)
        p = tl.exp(s - m)
        p_self = tl.exp(s_self - m)
        o = (tl.sum(p[:, None] * vw.to(tl.float32), 0) + p_self * v.to(tl.float32)) / (tl.sum(p, 0) + p_self)
        r = tl.load(REC + row * DV + rv, mask=mv, other=0.0).to(tl.float32)
        tl.store(O + row * DV + rv, (w_swa * o + w_rec * r).to(O.dtype.element_ty), mask=mv)
    # Every thread has read the window before any writes it shifted by one.
    tl.debug_barrier()
    shift = (rw[:, None] >= 1) & mw[:, None]
    tl.store(KW + pid * W * D + (rw[:, None] - 1) * D + rd[None, :], kw, mask=shift & md[None, :])
    tl.store(VW + pid * W * DV + (rw[:, None] - 1) * DV + rv[None, :], vw, mask=shift & mv[None, :])
    tl.store(KW + pid * W * D + (W - 1) * D + rd, k, mask=md)
    tl.store(VW + pid * W * DV + (W - 1) * DV + rv, v.to(VW.dtype.element_ty), mask=mv)


def window_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rec: Tensor,
    keys: Tensor,
    values: Tensor,
    valid: Tensor,
    scale: float,
    w_swa: float,
    w_rec: float,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
) -> Tensor:
    """The step in one Triton launch; arguments and result as ``window_decode_reference``'s.

    ``keys``/``values``/``valid`` must be contiguous (a static cache's buffers are); the others are made so.
    """
    B, Hq, D = q.shape
    Hkv, W, Dv = keys.shape[1], keys.shape[2], values.shape[3]
    if not (keys.is_contiguous() and values.is_contiguous() and valid.is_contiguous()):
        raise ValueError("window_decode: the window buffers must be contiguous")
    rope = cos is not None and sin is not None
    if rope and D % 2:
        raise ValueError(f"window_decode: rotate-half RoPE needs an even head dim, got {D}")
    out = torch.empty(B, Hq, Dv, dtype=q.dtype, device=q.device)
    c = cos.contiguous() if rope else q
    s = sin.contiguous() if rope else q
    _window_decode_kernel[(B * Hkv,)](
        q.contiguous(), k.contiguous(), v.contiguous(), rec.contiguous(), keys, values, valid, c, s, out,
        float(scale), float(w_swa), float(w_rec),
        HKV=Hkv, G=Hq // Hkv, W=W, D=D, DV=Dv, BW=triton.next_power_of_2(W), BD=triton.next_power_of_2(D),
        BDV=triton.next_power_of_2(Dv), ROPE=rope, num_warps=4,
    )  # fmt: skip
    return out
