"""The Liger attention op: the specification, the PyTorch form and the Triton kernels against it.

Ladder: the naive softmax branch against independent closed forms (full causal attention when the window covers
the sequence, v itself when the window is 0); the PyTorch form against the spec in fp64 (outputs, final states,
every gradient); Triton under the interpreter against the spec in fp32 (tiny shapes); Triton on the GPU (``-m gpu``)
against the PyTorch form in fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from surgery.kernels import liger
from surgery.kernels.liger import (
    banded_sliding_window_attention,
    liger_attention,
    naive_liger_attention,
    naive_sliding_window_attention,
    torch_liger_attention,
)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
NAMES = ("q_rope", "k_rope", "q_feat", "k_feat", "v", "gk", "h0")


def make(B, T, Hq, Hkv, D, *, init=True, dtype=torch.float64, seed=0, device=DEV):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    return {
        "q_rope": rnd(B, T, Hq, D).to(dtype),
        "k_rope": rnd(B, T, Hkv, D).to(dtype),
        "q_feat": rnd(B, T, Hq, D).softmax(-1).to(dtype),
        "k_feat": rnd(B, T, Hkv, D).softmax(-1).to(dtype),
        "v": rnd(B, T, Hkv, D).to(dtype),
        "gk": F.logsigmoid(rnd(B, T, Hkv, D)).to(dtype),
        "h0": rnd(B, Hkv, D, D).to(torch.float32 if dtype != torch.float64 else dtype) if init else None,
    }


def run(fn, x, **kw):
    """Output, final state and the gradients of a random projection of both, w.r.t. every input."""
    leaves = {n: (x[n].detach().clone().requires_grad_() if x[n] is not None else None) for n in NAMES}
    o, ht = fn(*(leaves[n] for n in NAMES[:6]), initial_state=leaves["h0"], output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
    loss = loss + (ht.double() * torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
    live = [n for n in NAMES if leaves[n] is not None]
    grads = torch.autograd.grad(loss, [leaves[n] for n in live])
    return {"o": o.detach(), "ht": ht.detach(), **{f"d{n}": g for n, g in zip(live, grads)}}


def assert_close(got, want, rtol, atol):
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, name
        assert torch.isfinite(g).all(), f"{name}: not finite"
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ the reference against closed forms


def test_naive_window_covering_the_sequence_is_causal_attention():
    x = make(2, 9, 4, 2, 8)
    got = naive_sliding_window_attention(x["q_rope"], x["k_rope"], x["v"], window=8, scale=0.4)
    want = F.scaled_dot_product_attention(x["q_rope"].transpose(1, 2), x["k_rope"].transpose(1, 2),
                                          x["v"].transpose(1, 2), is_causal=True, scale=0.4, enable_gqa=True)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_naive_window_zero_returns_the_values():
    x = make(1, 6, 4, 2, 8)
    got = naive_sliding_window_attention(x["q_rope"], x["k_rope"], x["v"], window=0, scale=1.0, softcap=2.0)
    torch.testing.assert_close(got, x["v"].repeat_interleave(2, dim=2), rtol=0, atol=1e-14)


def test_naive_mix_weights_select_the_branches():
    x = make(1, 5, 2, 1, 8)
    args = [x[n] for n in NAMES[:6]]
    swa_only, _ = naive_liger_attention(*args, window=2, scale=0.5, w_swa=1.0, w_rec=0.0)
    torch.testing.assert_close(swa_only, naive_sliding_window_attention(*args[:2], args[4], 2, 0.5))
    rec_only, _ = naive_liger_attention(*args, window=2, scale=0.5, w_swa=0.0, w_rec=1.0)
    from surgery.kernels.gla import naive_recurrent_gla

    torch.testing.assert_close(rec_only, naive_recurrent_gla(x["q_feat"], x["k_feat"], x["v"], x["gk"])[0])


# ------------------------------------------------------------------ the PyTorch form against the spec (fp64)

TORCH_CASES = [  # T, Hq, Hkv, window, softcap, init
    (1, 2, 1, 3, None, True),
    (7, 2, 1, 0, None, False),
    (64, 4, 2, 64, 5.0, True),
    (65, 2, 2, 5, None, True),
    (130, 4, 1, 40, None, False),
    (50, 1, 1, 200, 3.0, True),
]


@pytest.mark.parametrize(("T", "Hq", "Hkv", "window", "softcap", "init"), TORCH_CASES,
                         ids=[f"T{c[0]}-Hq{c[1]}-Hkv{c[2]}-w{c[3]}-cap{c[4]}-{'h0' if c[5] else 'zero'}"
                              for c in TORCH_CASES])
def test_torch_form_matches_naive(T, Hq, Hkv, window, softcap, init):
    x = make(2 if T < 64 else 1, T, Hq, Hkv, 8, init=init, seed=T)
    kw = dict(window=window, scale=0.3, softcap=softcap, w_swa=0.6, w_rec=0.4)
    assert_close(run(torch_liger_attention, x, **kw), run(naive_liger_attention, x, **kw), rtol=1e-10, atol=1e-10)


def test_banded_softmax_memory_is_linear_in_length(monkeypatch):
    # the score tensors of the banded form are [.., T / bs, bs, 2 * bs]: count what the softmax sees
    x = make(1, 1024, 1, 1, 8, dtype=torch.float32, device="cpu")
    seen = []
    real = torch.Tensor.softmax

    def spy(self, *a, **k):
        seen.append(self.numel())
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "softmax", spy)
    banded_sliding_window_attention(x["q_rope"], x["k_rope"], x["v"], window=16, scale=1.0)
    assert seen == [1024 * 2 * 32]  # T x 2 * block (block = max(window, 32)), not T x T


def test_dispatcher_uses_the_torch_form_on_cpu_and_checks_arguments():
    x = make(1, 10, 2, 1, 8, device="cpu")
    args = [x[n] for n in NAMES[:6]]
    o, ht = liger_attention(*args, window=3, scale=0.5)
    want, _ = torch_liger_attention(*args, window=3, scale=0.5)
    assert ht is None
    torch.testing.assert_close(o, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend"):
        liger_attention(*args, window=3, scale=0.5, backend="cuda")
    with pytest.raises(ValueError, match="window"):
        liger_attention(*args, window=-1, scale=0.5)
    with pytest.raises(ValueError, match="gk must have shape"):
        liger_attention(*args[:5], args[5][..., :4], window=3, scale=0.5)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        bad = make(1, 10, 3, 2, 8, device="cpu")
        liger_attention(*(bad[n] for n in NAMES[:6]), window=3, scale=0.5)


# ------------------------------------------------------------------ Triton (interpreter on CPU, fp32, tiny)

TRITON_CASES = [  # T, Hq, Hkv, window, softcap, init
    (1, 2, 1, 3, None, True),
    (7, 2, 1, 0, None, False),
    (37, 4, 2, 5, 3.0, True),
    (40, 2, 2, 20, None, True),
    (20, 1, 1, 200, None, False),
]


@pytest.fixture
def small_tiles(monkeypatch):
    from surgery.kernels.liger import swa_triton

    # 16-row tiles make the band span several key blocks (and query blocks) at these lengths
    monkeypatch.setitem(swa_triton.CONFIG, "bm", 16)
    monkeypatch.setitem(swa_triton.CONFIG, "bn", 16)


@pytest.mark.parametrize(("T", "Hq", "Hkv", "window", "softcap", "init"), TRITON_CASES,
                         ids=[f"T{c[0]}-Hq{c[1]}-Hkv{c[2]}-w{c[3]}-cap{c[4]}-{'h0' if c[5] else 'zero'}"
                              for c in TRITON_CASES])
def test_triton_matches_naive(small_tiles, T, Hq, Hkv, window, softcap, init):
    x = make(2 if T < 30 else 1, T, Hq, Hkv, 16, init=init, dtype=torch.float32, seed=T + 2)
    kw = dict(window=window, scale=0.3, softcap=softcap)
    got = run(lambda *a, **k: liger_attention(*a, **k, backend="triton"), x, **kw)
    assert_close(got, run(naive_liger_attention, x, **kw), rtol=1e-5, atol=1e-5)


def test_triton_branch_weights(small_tiles):
    # the recurrent weight is folded into the GLA scale and the softmax weight into the kernel's mix and backward
    x = make(1, 33, 2, 1, 16, dtype=torch.float32, seed=8)
    kw = dict(window=7, scale=0.3, w_swa=0.7, w_rec=0.2, rec_scale=1.5)
    got = run(lambda *a, **k: liger_attention(*a, **k, backend="triton"), x, **kw)
    assert_close(got, run(naive_liger_attention, x, **kw), rtol=1e-5, atol=1e-5)


def test_triton_softmax_branch_alone(small_tiles):
    from surgery.kernels.liger.swa_triton import sliding_window_attention_triton

    x = make(2, 21, 4, 2, 16, dtype=torch.float32, seed=9)
    leaves = [x[n].detach().clone().requires_grad_() for n in ("q_rope", "k_rope", "v")]
    refs = [x[n].detach().clone().requires_grad_() for n in ("q_rope", "k_rope", "v")]
    got = sliding_window_attention_triton(*leaves, window=6, scale=0.4, softcap=2.0)
    want = naive_sliding_window_attention(*refs, window=6, scale=0.4, softcap=2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    r = torch.randn(got.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    for g, w in zip(torch.autograd.grad((got * r).sum(), leaves), torch.autograd.grad((want * r).sum(), refs)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_triton_default_tiles_and_value_head_dim():
    # default 64-row tiles, Dv != D
    x = make(1, 70, 2, 1, 16, dtype=torch.float32, seed=5)
    x["v"] = torch.randn(1, 70, 1, 32, generator=torch.Generator().manual_seed(6)).to(DEV)
    x["h0"] = torch.randn(1, 1, 16, 32, generator=torch.Generator().manual_seed(7)).to(DEV)
    kw = dict(window=64, scale=0.25)
    got = run(lambda *a, **k: liger_attention(*a, **k, backend="triton"), x, **kw)
    assert_close(got, run(naive_liger_attention, x, **kw), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ GPU

GPU_CASES = [  # dtype, T, softcap
    ("bf16", 63, None),
    ("fp32", 64, None),
    ("bf16", 65, 30.0),
    ("bf16", 1000, None),
    ("fp32", 1000, 30.0),
    ("bf16", 4096, None),
    ("fp32", 4096, None),
]
TOL = {"bf16": 2e-2, "fp32": 5e-3}  # relative RMSE; fp32 loses to tf32 products


def rel_rmse(got, want):
    got, want = got.double(), want.double()
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "T", "softcap"), GPU_CASES, ids=[f"{c[0]}-T{c[1]}-cap{c[2]}" for c in GPU_CASES])
def test_gpu_triton_matches_torch_form(dtype, T, softcap):
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    x = make(1, T, 8, 2, 128, dtype=dt, seed=T)
    kw = dict(window=64, scale=128**-0.5, softcap=softcap)
    got = run(lambda *a, **k: liger_attention(*a, **k, backend="triton"), x, **kw)
    ref_x = {n: (t.float() if t is not None else None) for n, t in x.items()}
    want = run(torch_liger_attention, ref_x, **kw)
    for name, w in want.items():
        assert torch.isfinite(got[name]).all(), name
        err = rel_rmse(got[name], w)
        assert err <= TOL[dtype], f"{name}: relative RMSE {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.gpu
def test_gpu_auto_uses_triton(monkeypatch):
    def no_torch(*args, **kwargs):
        raise AssertionError("backend='auto' fell back to the PyTorch form on CUDA tensors")

    monkeypatch.setattr(liger, "torch_liger_attention", no_torch)
    x = make(1, 256, 4, 1, 64, dtype=torch.bfloat16, seed=3)
    fn, why = liger.load_triton()
    assert fn is not None, why
    o, _ = liger_attention(*(x[n] for n in NAMES[:6]), window=64, scale=0.125)
    want, _ = fn(*(x[n] for n in NAMES[:6]), window=64, scale=0.125)
    torch.testing.assert_close(o, want, rtol=0, atol=0)
