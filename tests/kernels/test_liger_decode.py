"""The fused decode step of Liger's window branch (``surgery.kernels.liger.decode``).

Ladder: the PyTorch step against the model's own path (``apply_rope`` then ``sliding_window_attention`` over the
window plus the new key, the window then shifted); the Triton kernel (interpreter on CPU) against the PyTorch step,
outputs and the window it leaves, with GQA, odd widths, a value head dim of its own, empty slots, and with or
without RoPE; on the GPU (``-m gpu``) in bf16.
"""

from __future__ import annotations

import pytest
import torch

from surgery.kernels.liger.decode import window_decode, window_decode_reference
from surgery.sites.rotary import apply_rope
from surgery.window import sliding_window_attention


def make(B, Hq, Hkv, W, D, Dv, *, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    pos = torch.randint(0, 50, (B,), generator=gen).float()
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    valid = torch.rand(B, W, generator=gen) > 0.3
    valid[0] = False  # a row with an empty window (fresh slot): the query sees only itself
    return dict(q=rnd(B, Hq, D), k=rnd(B, Hkv, D), v=rnd(B, Hkv, Dv), rec=rnd(B, Hq, Dv).float(),
                keys=rnd(B, Hkv, W, D), values=rnd(B, Hkv, W, Dv), valid=valid.to(device),
                cos=ang.cos().to(device, dtype), sin=ang.sin().to(device, dtype))  # fmt: skip


@pytest.mark.parametrize("rope", [True, False])
def test_reference_step_is_the_model_path(rope: bool) -> None:
    t = make(3, 6, 2, 5, 8, 8, dtype=torch.float64)
    keys0, values0 = t["keys"].clone(), t["values"].clone()
    cos, sin = (t["cos"], t["sin"]) if rope else (None, None)
    o = window_decode_reference(t["q"], t["k"], t["v"], t["rec"], t["keys"], t["values"], t["valid"], 0.3, 0.4, 0.7,
                                cos, sin)  # fmt: skip
    q, k = t["q"][:, :, None], t["k"][:, :, None]
    if rope:
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
    kw, vw = torch.cat([keys0, k], 2), torch.cat([values0, t["v"][:, :, None]], 2)
    ok = torch.cat([t["valid"], torch.ones(3, 1, dtype=torch.bool)], 1)
    swa = sliding_window_attention(q, kw, vw, 5, 0.3, key_valid=ok)[:, :, 0]
    torch.testing.assert_close(o, 0.4 * swa + 0.7 * t["rec"])
    assert torch.equal(t["keys"], kw[:, :, 1:]) and torch.equal(t["values"], vw[:, :, 1:])


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 2, 4, 8, 8), (3, 6, 2, 5, 12, 10), (1, 3, 3, 1, 6, 6), (2, 8, 1, 7, 16, 4)])
def test_triton_step_equals_the_reference(shape: tuple[int, ...], rope: bool) -> None:
    B, Hq, Hkv, W, D, Dv = shape
    a = make(B, Hq, Hkv, W, D, Dv)
    b = {name: t.clone() for name, t in a.items()}
    cos, sin = (a["cos"], a["sin"]) if rope else (None, None)
    args = ("q", "k", "v", "rec", "keys", "values", "valid")
    want = window_decode_reference(*(a[n] for n in args), 0.25, 0.5, 0.5, cos, sin)
    got = window_decode(*(b[n] for n in args), 0.25, 0.5, 0.5, cos, sin)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["keys"], a["keys"], rtol=1e-6, atol=1e-6)
    assert torch.equal(b["values"], a["values"])


def test_triton_step_refuses_what_it_cannot_run() -> None:
    t = make(1, 2, 1, 3, 5, 5)
    with pytest.raises(ValueError, match="even head dim"):
        window_decode(t["q"], t["k"], t["v"], t["rec"], t["keys"], t["values"], t["valid"], 1.0, 0.5, 0.5,
                      t["cos"], t["sin"])  # fmt: skip
    with pytest.raises(ValueError, match="contiguous"):
        window_decode(t["q"], t["k"], t["v"], t["rec"], t["keys"].transpose(2, 3), t["values"], t["valid"], 1.0,
                      0.5, 0.5)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("rope", [True, False])
def test_triton_step_on_the_gpu_in_bf16(rope: bool) -> None:
    a = make(8, 32, 8, 64, 128, 128, dtype=torch.bfloat16, device="cuda")
    b = {name: t.clone() for name, t in a.items()}
    cos, sin = (a["cos"], a["sin"]) if rope else (None, None)
    args = ("q", "k", "v", "rec", "keys", "values", "valid")
    want = window_decode_reference(*(a[n] for n in args), 0.088, 0.5, 0.5, cos, sin)
    got = window_decode(*(b[n] for n in args), 0.088, 0.5, 0.5, cos, sin)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(b["keys"].float(), a["keys"].float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(b["values"], a["values"])
