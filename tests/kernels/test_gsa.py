"""The GSA ladder: the token loop against a closed form, then the two-pass forms against the loop."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from surgery.kernels.gsa import chunk_gsa, fused_recurrent_gsa, naive_recurrent_gsa

F64 = torch.float64
TIGHT = {"atol": 1e-10, "rtol": 1e-10}
NAMES = ("q", "k", "v", "s", "g", "hk0", "hv0")


pytestmark = pytest.mark.usefixtures("one_thread")


def make(B, T, Hq, Hkv, init, K=8, V=6, M=5, N=None, dtype=F64, seed=0):
    """Random inputs; the slot gate is logsigmoid and the write weight ``1 - e^g``, as GSA layers make them."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    g = F.logsigmoid(rnd(B, T, Hkv, M) + 1)
    N = N or B
    return {
        "q": rnd(B, T, Hq, K),
        "k": rnd(B, T, Hkv, K),
        "v": rnd(B, T, Hkv, V),
        "s": 1 - g.exp(),
        "g": g,
        "hk0": rnd(N, Hkv, K, M) if init else None,
        "hv0": rnd(N, Hkv, M, V) if init else None,
    }


def call(fn, x, scale=0.6, cu=None, final=True, **kw):
    state = (x["hk0"], x["hv0"]) if x["hk0"] is not None else None
    return fn(x["q"], x["k"], x["v"], x["s"], x["g"], scale, state, final, cu, **kw)


def run_with_grads(fn, x, seed=1, **kw):
    x = {n: (t.clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    o, (hk, hv) = call(fn, x, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in (o, hk, hv))
    live = [n for n in NAMES if x[n] is not None]
    grads = torch.autograd.grad(loss, [x[n] for n in live])
    return {"o": o, "hk": hk, "hv": hv, **{f"d{n}": g for n, g in zip(live, grads)}}


def assert_all_close(got, want, **tol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def closed_form(q, k, v, s, g, scale, hk0, hv0):
    """One sequence ([T, H, D] inputs): both slot states at every t as direct decayed sums, then read out."""
    T, Hq, K = q.shape
    Hkv = k.shape[1]
    G = g.cumsum(0)  # [T, h, M]
    decay = (G[:, None] - G[None]).exp() * torch.ones(T, T, dtype=F64).tril()[:, :, None, None]  # [t, s', h, M]
    hk = torch.einsum("tuhm,uhk,uhm->thkm", decay, k, s)
    hv = torch.einsum("tuhm,uhm,uhv->thmv", decay, s, v)
    if hk0 is not None:
        hk = hk + hk0 * G.exp()[:, :, None, :]
        hv = hv + hv0 * G.exp()[..., None]
    p = torch.softmax(scale * torch.einsum("thgk,thkm->thgm", q.reshape(T, Hkv, Hq // Hkv, K), hk), -1)
    return torch.einsum("thgm,thmv->thgv", p, hv).reshape(T, Hq, -1), hk[-1], hv[-1]


HEADS = [(1, 1), (3, 1), (4, 2)]


def hid(hq, hkv):
    return f"Hq{hq}-Hkv{hkv}"


@pytest.mark.parametrize("heads", HEADS, ids=[hid(*h) for h in HEADS])
@pytest.mark.parametrize("init", [False, True], ids=["zero", "h0"])
def test_naive_matches_closed_form(heads, init):
    x = make(2, 11, *heads, init)
    o, (hk, hv) = call(naive_recurrent_gsa, x)
    for b in range(2):
        parts = [x[n][b] if x[n] is not None else None for n in NAMES]
        o_ref, hk_ref, hv_ref = closed_form(*parts[:5], 0.6, *parts[5:])
        torch.testing.assert_close(o[b], o_ref, **TIGHT)
        torch.testing.assert_close(hk[b], hk_ref, **TIGHT)
        torch.testing.assert_close(hv[b], hv_ref, **TIGHT)


CASES = list(itertools.product([1, 7, 65, 130], HEADS[1:], [False, True]))


@pytest.mark.parametrize(
    ("T", "heads", "init"), CASES, ids=[f"T{t}-{hid(*h)}-{'h0' if i else 'zero'}" for t, h, i in CASES]
)
@pytest.mark.parametrize("api", [chunk_gsa, fused_recurrent_gsa], ids=["chunk", "fused_recurrent"])
def test_two_passes_match_naive(api, T, heads, init):
    x = make(2 if T < 100 else 1, T, *heads, init, seed=T)
    want = run_with_grads(naive_recurrent_gsa, x)
    assert_all_close(run_with_grads(api, x, backend="torch"), want, **TIGHT)


def test_prefill_then_decode_equals_full_run():
    x = make(2, 40, 4, 2, True, seed=5)
    o_full, (hk_full, hv_full) = call(naive_recurrent_gsa, x)
    first = {n: (t[:, :30] if n not in ("hk0", "hv0") else t) for n, t in x.items()}
    o, (hk, hv) = call(chunk_gsa, first)
    outs = [o]
    for t in range(30, 40):
        step = {n: x[n][:, t : t + 1] for n in NAMES[:5]}
        o, (hk, hv) = call(fused_recurrent_gsa, {**step, "hk0": hk, "hv0": hv})
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), o_full, **TIGHT)
    torch.testing.assert_close(hk, hk_full, **TIGHT)
    torch.testing.assert_close(hv, hv_full, **TIGHT)


@pytest.mark.parametrize(
    "api", [naive_recurrent_gsa, chunk_gsa, fused_recurrent_gsa], ids=["naive", "chunk", "fused_recurrent"]
)
def test_varlen_equals_separate_runs(api):
    cu = [0, 0, 1, 30, 30, 75]
    x = make(1, cu[-1], 3, 1, True, N=len(cu) - 1, seed=6)
    o, (hk, hv) = call(api, x, cu=torch.tensor(cu))
    for n, (a, b) in enumerate(itertools.pairwise(cu)):
        seg = {m: x[m][:, a:b] for m in NAMES[:5]} | {"hk0": x["hk0"][n : n + 1], "hv0": x["hv0"][n : n + 1]}
        o_ref, (hk_ref, hv_ref) = call(naive_recurrent_gsa, seg)
        torch.testing.assert_close(o[:, a:b], o_ref, **TIGHT)
        torch.testing.assert_close(hk[n : n + 1], hk_ref, **TIGHT)
        torch.testing.assert_close(hv[n : n + 1], hv_ref, **TIGHT)


def test_backends_agree_and_fp32_stays_close():
    x = make(1, 50, 4, 2, True, dtype=torch.float32, seed=7)
    o_ref, (hk_ref, hv_ref) = call(naive_recurrent_gsa, x)
    for api, backend in itertools.product([chunk_gsa, fused_recurrent_gsa], ["auto", "torch", "naive"]):
        o, (hk, hv) = call(api, x, backend=backend)
        assert o.dtype == torch.float32 and hk.dtype == torch.float32
        torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hk, hk_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hv, hv_ref, atol=1e-4, rtol=1e-4)


def test_extreme_gates_stay_finite():
    x = make(1, 300, 2, 1, True, dtype=torch.float32, seed=8)
    x["g"][..., ::2] = -500.0  # half the slots forget everything at every step
    got = run_with_grads(chunk_gsa, x)
    for name, t in got.items():
        assert torch.isfinite(t).all(), name
    o_ref, _ = call(naive_recurrent_gsa, x)
    torch.testing.assert_close(got["o"], o_ref, atol=1e-4, rtol=1e-4)


def test_bad_inputs_raise():
    x = make(1, 4, 3, 1, True)
    with pytest.raises(ValueError, match="s must"):
        call(chunk_gsa, {**x, "s": x["s"][:, :, :, None]})
    with pytest.raises(ValueError, match="g must"):
        call(chunk_gsa, {**x, "g": x["g"][..., :2]})
    with pytest.raises(ValueError, match="pair"):
        chunk_gsa(x["q"], x["k"], x["v"], x["s"], x["g"], 1.0, x["hk0"])
    with pytest.raises(ValueError, match="backend"):
        call(fused_recurrent_gsa, x, backend="gpu")
