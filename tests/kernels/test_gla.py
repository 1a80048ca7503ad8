"""The GLA ladder: the specification checked against a closed form, then every faster form against the spec.

Rungs: (1) naive loop == direct O(T^2) sum; (2) chunked torch form == naive in fp64, outputs, final states and all
gradients; (3) cu_seqlens == separate runs; (4) token-loop form and prefill/decode chaining; (5) gates of -500 per
step stay finite; (6) the dispatcher.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F

import surgery.kernels.gla as gla
from surgery.kernels.gla import chunk_gla, fused_recurrent_gla, naive_recurrent_gla
from surgery.kernels.gla.torch_ops import torch_chunk_gla, torch_gla_state, torch_recurrent_gla

F64 = torch.float64
TIGHT = {"atol": 1e-10, "rtol": 1e-10}
NAMES = ("q", "k", "v", "gk", "gv", "h0")


def make(B, T, Hq, Hkv, gates, init, K=8, V=6, N=None, dtype=F64, seed=0):
    """Random inputs as a dict of the spec's arguments; gates are logsigmoid, so in (-inf, 0)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {
        "q": rnd(B, T, Hq, K),
        "k": rnd(B, T, Hkv, K),
        "v": rnd(B, T, Hkv, V),
        "gk": F.logsigmoid(rnd(B, T, Hkv, K) + 1) if "gk" in gates or gates == "both" else None,
        "gv": F.logsigmoid(rnd(B, T, Hkv, V) + 1) if "gv" in gates or gates == "both" else None,
        "h0": rnd(N or B, Hkv, K, V) if init else None,
    }


def call(fn, x, scale=0.7, cu=None, final=True, **kw):
    return fn(x["q"], x["k"], x["v"], x["gk"], x["gv"], scale, x["h0"], final, cu, **kw)


def run_with_grads(fn, x, seed=1, **kw):
    """Output, final state and the gradients of a loss that mixes both with random weights."""
    x = {n: (t.clone().requires_grad_() if t is not None else None) for n, t in x.items()}
    o, s = call(fn, x, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    live = [n for n in NAMES if x[n] is not None]
    grads = torch.autograd.grad(loss, [x[n] for n in live])
    return {"o": o, "final": s, **{f"d{n}": g for n, g in zip(live, grads)}}


def assert_all_close(got, want, **tol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def closed_form(q, k, v, gk, gv, scale, h0):
    """One sequence ([T, H, D] inputs) as a direct masked sum over all (t, s) pairs, fp64, no recurrence."""
    T, Hq, K = q.shape
    Hkv, V = v.shape[1:]
    if T == 0:  # an empty segment passes its initial state through
        return q.new_zeros(0, Hq, V), (h0 if h0 is not None else q.new_zeros(Hkv, K, V))
    bk = gk.cumsum(0) if gk is not None else torch.zeros(T, Hkv, K, dtype=F64)
    bv = gv.cumsum(0) if gv is not None else torch.zeros(T, Hkv, V, dtype=F64)
    mask = torch.ones(T, T, dtype=F64).tril()[:, :, None, None]  # s <= t
    dk = (bk[:, None] - bk[None]).exp() * mask  # [t, s, h, K]
    dv = (bv[:, None] - bv[None]).exp() * mask
    qg = q.reshape(T, Hkv, Hq // Hkv, K)
    o = torch.einsum("thgk,shk,tshk,tshv,shv->thgv", qg, k, dk, dv, v)
    s = torch.einsum("shk,shk,shv,shv->hkv", k, (bk[-1] - bk).exp(), v, (bv[-1] - bv).exp())
    if h0 is not None:
        o = o + torch.einsum("thgk,thk,hkv,thv->thgv", qg, bk.exp(), h0, bv.exp())
        s = s + bk[-1].exp()[..., None] * h0 * bv[-1].exp()[:, None]
    return scale * o.reshape(T, Hq, V), s


pytestmark = pytest.mark.usefixtures("one_thread")


HEADS = [(1, 1), (3, 1), (4, 2)]
GATES = ["gk", "gv", "both"]


def hid(hq, hkv):
    return f"Hq{hq}-Hkv{hkv}"


# (1) The reference against an independent closed form.
@pytest.mark.parametrize("heads", HEADS, ids=[hid(*h) for h in HEADS])
@pytest.mark.parametrize("gates", [*GATES, "none"])
@pytest.mark.parametrize("init", [False, True], ids=["zero", "h0"])
def test_naive_matches_closed_form(heads, gates, init):
    x = make(2, 12, *heads, gates, init)
    o, s = call(naive_recurrent_gla, x)
    for b in range(2):
        parts = [x[n][b] if x[n] is not None else None for n in NAMES]
        o_ref, s_ref = closed_form(*parts[:5], 0.7, parts[5])
        torch.testing.assert_close(o[b], o_ref, **TIGHT)
        torch.testing.assert_close(s[b], s_ref, **TIGHT)


def test_naive_varlen_matches_closed_form():
    cu = torch.tensor([0, 0, 5, 6, 6, 14])
    x = make(1, 14, 3, 1, "both", True, N=5)
    o, s = call(naive_recurrent_gla, x, cu=cu)
    for n, (a, b) in enumerate(itertools.pairwise(cu.tolist())):
        o_ref, s_ref = closed_form(*(x[m][0, a:b] for m in NAMES[:5]), 0.7, x["h0"][n])
        torch.testing.assert_close(o[0, a:b], o_ref, **TIGHT)
        torch.testing.assert_close(s[n], s_ref, **TIGHT)


# (2) Chunked torch form against the reference: outputs, states and every gradient, fp64. Hq4-Hkv2 (several
# groups of several heads) runs at fewer lengths to keep the suite fast.
CASES = [
    *itertools.product([1, 7, 64, 65, 200], HEADS[:2], GATES, [False, True]),
    *itertools.product([7, 65], HEADS[2:], GATES, [False, True]),
]


@pytest.mark.parametrize(
    ("T", "heads", "gates", "init"), CASES, ids=[f"T{t}-{hid(*h)}-{g}-{'h0' if i else 'zero'}" for t, h, g, i in CASES]
)
def test_chunk_matches_naive(T, heads, gates, init):
    x = make(2 if T < 100 else 1, T, *heads, gates, init, seed=T)
    assert_all_close(run_with_grads(torch_chunk_gla, x), run_with_grads(naive_recurrent_gla, x), **TIGHT)


@pytest.mark.parametrize("chunk_size", [4, 8, 12, 24, 64, 128])
def test_chunk_sizes_agree(chunk_size):
    # 12 is not a multiple of the 8-row sub-chunk, 4 is smaller than it: both use one elementwise block.
    x = make(1, 77, 3, 1, "both", True)
    want = run_with_grads(naive_recurrent_gla, x)
    assert_all_close(run_with_grads(torch_chunk_gla, x, chunk_size=chunk_size), want, **TIGHT)


@pytest.mark.parametrize("gates", [*GATES, "none"])
@pytest.mark.parametrize("T", [1, 31, 64, 77])
def test_state_only_equals_the_final_state_of_the_spec(T, gates):
    x = make(2, T, 3, 1, gates, True, seed=T)
    want = call(naive_recurrent_gla, x)[1]
    got = torch_gla_state(x["k"], x["v"], x["gk"], x["gv"], x["h0"], chunk_size=16)
    torch.testing.assert_close(got, want, **TIGHT)
    got = torch_gla_state(x["k"], x["v"], x["gk"], x["gv"], None)  # zero state, one chunk of 64
    torch.testing.assert_close(got, call(naive_recurrent_gla, {**x, "h0": None})[1], **TIGHT)


def test_chunk_fp32_inputs_give_fp32_state_and_v_dtype_output():
    x = make(2, 70, 3, 1, "gk", True, dtype=torch.float32)
    o, s = call(torch_chunk_gla, x)
    o_ref, s_ref = call(naive_recurrent_gla, x)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)


def test_no_final_state_unless_asked():
    x = make(1, 5, 1, 1, "gk", False)
    assert call(torch_chunk_gla, x, final=False)[1] is None
    assert call(torch_recurrent_gla, x, final=False)[1] is None


# (3) Variable-length segments equal separate runs, for every form.
CU = [0, 0, 1, 21, 21, 100, 103]  # empty first and middle segments, a length-1 one, one longer than a chunk


@pytest.mark.parametrize(
    "fn", [naive_recurrent_gla, torch_chunk_gla, torch_recurrent_gla], ids=["naive", "chunk", "recurrent"]
)
def test_varlen_equals_separate_runs(fn):
    N = len(CU) - 1
    x = make(1, CU[-1], 4, 2, "both", True, N=N, seed=3)
    got = run_with_grads(fn, x, cu=torch.tensor(CU))
    for n, (a, b) in enumerate(itertools.pairwise(CU)):
        seg = {m: (x[m][:, a:b] if m != "h0" else x[m][n : n + 1]) for m in NAMES}
        o, s = call(fn, seg)
        torch.testing.assert_close(got["o"][:, a:b], o, **TIGHT)
        torch.testing.assert_close(got["final"][n : n + 1], s, **TIGHT)
    if fn is not naive_recurrent_gla:
        assert_all_close(got, run_with_grads(naive_recurrent_gla, x, cu=torch.tensor(CU)), **TIGHT)


def test_varlen_bad_cu_seqlens():
    x = make(1, 10, 1, 1, "gk", False)
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(torch_chunk_gla, x, cu=torch.tensor([0, 4, 9]))  # does not reach T
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(torch_recurrent_gla, x, cu=torch.tensor([0, 6, 4, 10]))  # decreasing
    with pytest.raises(ValueError, match="batch size 1"):
        call(torch_chunk_gla, make(2, 10, 1, 1, "gk", False), cu=torch.tensor([0, 10]))


# (4) The token-loop form, and prefill + decode chaining.
REC = list(itertools.product([1, 5], HEADS, GATES))


@pytest.mark.parametrize(("T", "heads", "gates"), REC, ids=[f"T{t}-{hid(*h)}-{g}" for t, h, g in REC])
def test_recurrent_matches_naive(T, heads, gates):
    x = make(3, T, *heads, gates, True, seed=T)
    assert_all_close(run_with_grads(torch_recurrent_gla, x), run_with_grads(naive_recurrent_gla, x), **TIGHT)


@pytest.mark.parametrize("gates", GATES)
def test_prefill_then_decode_equals_full_run(gates):
    T, P = 90, 70
    x = make(2, T, 4, 2, gates, True, seed=7)
    o_full, s_full = call(naive_recurrent_gla, x)
    first = {m: (t[:, :P] if m != "h0" and t is not None else t) for m, t in x.items()}
    o, state = call(torch_chunk_gla, first)
    outs = [o]
    for t in range(P, T):
        step = {m: (x[m][:, t : t + 1] if m != "h0" and x[m] is not None else None) for m in NAMES}
        step["h0"] = state
        o, state = call(torch_recurrent_gla, step)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), o_full, **TIGHT)
    torch.testing.assert_close(state, s_full, **TIGHT)


def test_chunk_calls_chain():
    x = make(2, 150, 3, 1, "both", True, seed=8)
    o_full, s_full = call(torch_chunk_gla, x)
    head = {m: (t[:, :37] if m != "h0" else t) for m, t in x.items()}
    o1, s1 = call(torch_chunk_gla, head)
    tail = {m: (t[:, 37:] if m != "h0" else s1) for m, t in x.items()}
    o2, s2 = call(torch_chunk_gla, tail)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_full, **TIGHT)
    torch.testing.assert_close(s2, s_full, **TIGHT)


def test_varlen_decode_step_equals_batched_step():
    # Three sequences decoding one token each, packed with cu_seqlens, against the same step as a batch of 3.
    x = make(3, 1, 4, 2, "both", True, seed=9)
    packed = {m: (t.transpose(0, 1) if m != "h0" else t) for m, t in x.items()}  # [1, 3, H, D]
    o, s = call(torch_recurrent_gla, packed, cu=torch.tensor([0, 1, 2, 3]))
    o_ref, s_ref = call(torch_recurrent_gla, x)
    torch.testing.assert_close(o, o_ref.transpose(0, 1), **TIGHT)
    torch.testing.assert_close(s, s_ref, **TIGHT)


# (5) Extreme gates: exponents are never positive, so nothing overflows, in fp32, over long inputs.
@pytest.mark.parametrize("T", [300, 4096])
def test_extreme_gates_stay_finite(T):
    x = make(1, T, 2, 1, "both", True, K=4, V=4, dtype=torch.float32, seed=T)
    gen = torch.Generator().manual_seed(0)
    # Half the dimensions barely decay (states grow over all of T), the rest get -500 per step or in bursts.
    x["gk"][..., 2:] = -500.0
    x["gk"][..., :2] = -1e-3
    x["gv"] = torch.where(torch.rand(x["gv"].shape, generator=gen) < 0.2, -500.0, x["gv"])
    got = run_with_grads(torch_chunk_gla, x)
    for name, t in got.items():
        assert torch.isfinite(t).all(), name
    o_ref, s_ref = call(naive_recurrent_gla, x)
    scale = o_ref.abs().max()
    torch.testing.assert_close(got["o"], o_ref, atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(got["final"], s_ref, atol=1e-5 * s_ref.abs().max(), rtol=1e-4)


def test_recurrent_extreme_gates_stay_finite():
    x = make(2, 3, 3, 1, "both", True, dtype=torch.float32)
    x["gk"] = torch.full_like(x["gk"], -500.0)
    x["gv"] = torch.full_like(x["gv"], -500.0)
    got = run_with_grads(torch_recurrent_gla, x)
    assert all(torch.isfinite(t).all() for t in got.values())
    # Full forgetting: each step sees only its own k^T v.
    qg = x["q"].view(2, 3, 1, 3, 8)
    want = 0.7 * torch.einsum("bthgk,bthk,bthv->bthgv", qg, x["k"], x["v"]).reshape(2, 3, 3, 6)
    torch.testing.assert_close(got["o"], want, atol=1e-5, rtol=1e-5)


# (6) The dispatcher.
@pytest.mark.parametrize("api", [chunk_gla, fused_recurrent_gla], ids=["chunk", "fused_recurrent"])
def test_backends_agree_on_cpu(api):
    x = make(1, 40, 4, 2, "both", True, N=2, seed=11)
    cu = torch.tensor([0, 15, 40])
    results = [call(api, x, cu=cu, backend=b) for b in ("auto", "torch", "naive")]
    for o, s in results[1:]:
        torch.testing.assert_close(o, results[0][0], **TIGHT)
        torch.testing.assert_close(s, results[0][1], **TIGHT)


def test_unknown_backend_and_bad_shapes_raise():
    x = make(1, 4, 4, 2, "gk", True)
    with pytest.raises(ValueError, match="backend"):
        call(chunk_gla, x, backend="cuda")
    with pytest.raises(ValueError, match="gk"):
        call(chunk_gla, {**x, "gk": x["gk"][..., :3]})
    with pytest.raises(ValueError, match="multiple"):
        call(chunk_gla, {**make(1, 4, 3, 2, "gk", False)})
    with pytest.raises(ValueError, match="initial_state"):
        call(fused_recurrent_gla, {**x, "h0": x["h0"][:, :1]})


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(gla, "load_triton", lambda module, name: (lambda *a: pytest.fail("ran"), ""))
    with pytest.raises(ValueError, match="CUDA"):
        call(chunk_gla, make(1, 4, 1, 1, "gk", False), backend="triton")
    monkeypatch.setattr(gla, "load_triton", lambda module, name: (None, "ImportError: no triton"))
    with pytest.raises(RuntimeError, match="no triton"):
        call(fused_recurrent_gla, make(1, 4, 1, 1, "gk", False), backend="triton")


def test_auto_falls_back_when_triton_declines_or_is_missing(monkeypatch, caplog):
    x = make(1, 20, 2, 1, "both", True)
    want = call(torch_chunk_gla, x)
    monkeypatch.setattr(gla, "auto_uses_triton", lambda q: True)  # pretend q lives on a GPU

    def declines(*args, **kwargs):
        raise NotImplementedError("K and V must be <= 256")

    monkeypatch.setattr(gla, "load_triton", lambda module, name: (declines, ""))
    torch.testing.assert_close(call(chunk_gla, x), want, **TIGHT)
    monkeypatch.setattr(gla, "load_triton", lambda module, name: (None, "ImportError: no triton"))
    monkeypatch.setattr(gla, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="surgery.kernels.gla"):
        torch.testing.assert_close(call(chunk_gla, x), want, **TIGHT)
    assert "no triton" in caplog.text
    sentinel = (torch.zeros(1), None)
    monkeypatch.setattr(gla, "load_triton", lambda module, name: (lambda *args: sentinel, ""))
    assert call(fused_recurrent_gla, x) is sentinel


@pytest.mark.parametrize("api", [chunk_gla, fused_recurrent_gla], ids=["chunk", "fused_recurrent"])
def test_triton_interpreter_matches_torch(api, monkeypatch):
    which = "chunk" if api is chunk_gla else "fused_recurrent"
    fn, why = gla.load_triton(which, f"{which}_gla_triton")
    if fn is None:
        pytest.skip(f"Triton kernels not available: {why}")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = make(1, 20, 2, 1, "gk", True, K=16, V=16, dtype=torch.float32)
    try:
        o, s = call(api, x, backend="triton")
    except NotImplementedError as exc:
        pytest.skip(f"Triton kernel declines this call: {exc}")
    o_ref, s_ref = call(api, x, backend="torch")
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)
