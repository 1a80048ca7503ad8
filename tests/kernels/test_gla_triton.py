"""Triton GLA kernels against the specification (naive_recurrent_gla).

CPU (Triton interpreter, fp32, tiny shapes): chunked and fused-recurrent forms, outputs, final states and every
gradient, GQA, initial states, varlen segments (empty and length-1), the exact-diagonal fallback, decode steps.
GPU (``-m gpu``): bf16/fp32 at real head sizes with fla's relative-RMSE metric; long sequences are checked against
our fused-recurrent kernel in fp32, which is itself checked against the spec at short lengths.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from surgery.kernels.gla import chunk as chunk_mod
from surgery.kernels.gla import chunk_common
from surgery.kernels.gla.chunk import chunk_gla_triton
from surgery.kernels.gla.fused_recurrent import fused_recurrent_gla_step_, fused_recurrent_gla_triton
from surgery.kernels.gla.naive import naive_recurrent_gla

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
GRADS = ("dq", "dk", "dv", "dgk", "dgv", "dh0")


def make(B, T, Hq, Hkv, K, V, *, gk=True, gv=False, init=False, N=None, gate_div=1.0, dtype=torch.float32, seed=0):
    """Random inputs on DEV; gates are logsigmoid(randn) / gate_div, so in (-inf, 0)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEV)

    return {
        "q": rnd(B, T, Hq, K).to(dtype),
        "k": rnd(B, T, Hkv, K).to(dtype),
        "v": rnd(B, T, Hkv, V).to(dtype),
        "gk": (F.logsigmoid(rnd(B, T, Hkv, K)) / gate_div) if gk else None,
        "gv": (F.logsigmoid(rnd(B, T, Hkv, V)) / gate_div) if gv else None,
        "h0": rnd(N or B, Hkv, K, V) if init else None,
    }


def run(fn, x, scale=0.7, cu=None, final=True, upcast=False, seed=1):
    """Output, final state and the gradients of (o * r1).sum() + (ht * r2).sum(), r random."""
    names = ("q", "k", "v", "gk", "gv", "h0")
    leaves = {n: (x[n].detach().clone().requires_grad_() if x[n] is not None else None) for n in names}
    args = {n: (t.float() if (upcast and t is not None) else t) for n, t in leaves.items()}
    o, ht = fn(args["q"], args["k"], args["v"], args["gk"], args["gv"], scale, args["h0"], final, cu)
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
    if ht is not None:
        loss = loss + (ht * torch.randn(ht.shape, generator=gen).to(ht.device)).sum()
    live = [n for n in names if leaves[n] is not None]
    grads = torch.autograd.grad(loss, [leaves[n] for n in live])
    out = {"o": o.detach(), "ht": ht.detach() if ht is not None else None}
    out.update({f"d{n}": g for n, g in zip(live, grads)})
    return out


def rel_rmse(got, want):
    """fla's metric: RMS of the difference over RMS of the reference."""
    got, want = got.double(), want.double()
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_match(got, want, ratio, ratio_dg=None, atol=1e-6):
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: {g.shape}/{g.dtype} vs {w.shape}/{w.dtype}"
        assert torch.isfinite(g).all(), f"{name}: not finite"
        if (g.double() - w.double()).abs().max().item() <= atol:
            continue
        limit = ratio_dg if (ratio_dg is not None and name in ("dgk", "dgv")) else ratio
        err = rel_rmse(g, w)
        assert err <= limit, f"{name}: relative RMSE {err:.2e} > {limit:.0e}"


# ------------------------------------------------------------------ CPU: interpreter, fp32, tiny shapes

CHUNK_CASES = [  # T, K, V, Hq, Hkv, init
    (1, 16, 16, 1, 1, False),
    (7, 16, 32, 2, 1, True),
    (64, 32, 16, 2, 2, False),
    (65, 16, 16, 1, 1, True),
    (130, 32, 32, 2, 1, True),
]


@pytest.mark.parametrize(("T", "K", "V", "Hq", "Hkv", "init"), CHUNK_CASES,
                         ids=[f"T{c[0]}-K{c[1]}-V{c[2]}-Hq{c[3]}-Hkv{c[4]}-{'h0' if c[5] else 'zero'}" for c in CHUNK_CASES])
def test_chunk_matches_naive(T, K, V, Hq, Hkv, init):
    # gates / 4 keep every chunk's decay span small: the one-reference kernels take all of them
    x = make(2 if T < 64 else 1, T, Hq, Hkv, K, V, init=init, gate_div=4.0, seed=T)
    assert_match(run(chunk_gla_triton, x), run(naive_recurrent_gla, x), ratio=1e-5, atol=1e-5)


def test_chunk_varlen_with_empty_and_single_token_segments():
    cu = torch.tensor([0, 0, 1, 66, 66, 80], device=DEV)
    x = make(1, 80, 2, 1, 16, 16, init=True, N=5, seed=3)
    assert_match(run(chunk_gla_triton, x, cu=cu), run(naive_recurrent_gla, x, cu=cu), ratio=1e-5, atol=1e-5)


def test_chunk_small_tiles_loop_over_blocks(monkeypatch):
    # 16-wide tiles make every K and V loop and K-block grid take several steps; the state scan reads 2 chunks at once.
    for key in ("bv_fo", "bv_fdv", "bk_fdq", "bki", "bv_o", "bv_dv", "bk_dqk", "bvi_dqk", "bk_u", "bv_u", "bk_s", "bv_s"):
        monkeypatch.setitem(chunk_mod.CONFIG, key, 16)
    monkeypatch.setitem(chunk_mod.CONFIG, "uf", 2)
    x = make(1, 200, 4, 1, 32, 48, init=True, seed=8)
    assert_match(run(chunk_gla_triton, x), run(naive_recurrent_gla, x), ratio=1e-5, atol=1e-5)


@pytest.mark.parametrize("gv", [False, True], ids=["gk", "gk+gv"])
def test_chunk_saved_states_give_the_same_gradients(gv):
    cu = torch.tensor([0, 5, 5, 90], device=DEV)
    x = make(1, 90, 2, 1, 16, 16, gv=gv, init=True, N=3, gate_div=4.0, seed=10)
    saved = run(functools.partial(chunk_gla_triton, save_states=True), x, cu=cu)
    recomputed = run(chunk_gla_triton, x, cu=cu)
    for name, want in recomputed.items():  # same kernels on the same b, bv and states: equal to rounding
        torch.testing.assert_close(saved[name], want, rtol=1e-6, atol=1e-6, msg=name)
    assert_match(saved, run(naive_recurrent_gla, x, cu=cu), ratio=1e-5, atol=1e-5)


def test_chunk_sub_chunk_kernels(monkeypatch):
    # FAST_SPAN < 0 sends every chunk to the sub-chunk kernels (factorised diagonal blocks).
    monkeypatch.setattr(chunk_common, "FAST_SPAN", -1.0)
    x = make(1, 70, 2, 1, 32, 16, init=True, seed=9)
    assert_match(run(chunk_gla_triton, x), run(naive_recurrent_gla, x), ratio=1e-5, atol=1e-5)


def test_chunk_exact_diagonal_path(monkeypatch):
    # ...and SPAN_MAX < 0 sends every sub-chunk's diagonal block through the elementwise sum.
    monkeypatch.setattr(chunk_common, "FAST_SPAN", -1.0)
    monkeypatch.setattr(chunk_common, "SPAN_MAX", -1.0)
    x = make(1, 20, 2, 1, 16, 16, init=True, seed=4)
    assert_match(run(chunk_gla_triton, x), run(naive_recurrent_gla, x), ratio=1e-5, atol=1e-5)


def test_chunk_very_strong_decay_stays_finite_and_exact():
    # ~-25 per step: the factorised diagonal would overflow, so this exercises the automatic fallback.
    x = make(1, 24, 1, 1, 16, 16, init=True, gate_div=0.04, seed=5)
    assert_match(run(chunk_gla_triton, x), run(naive_recurrent_gla, x), ratio=1e-5, atol=1e-5)


def test_chunk_no_final_state_and_dtypes():
    x = make(1, 9, 2, 1, 16, 16, dtype=torch.bfloat16)
    o, ht = chunk_gla_triton(x["q"], x["k"], x["v"], x["gk"], output_final_state=False)
    assert ht is None and o.dtype == torch.bfloat16 and o.shape == (1, 9, 2, 16)
    o_ref, _ = naive_recurrent_gla(x["q"].float(), x["k"].float(), x["v"].float(), x["gk"])
    assert rel_rmse(o, o_ref) < 1e-2


def test_chunk_rejects_bad_inputs():
    x = make(1, 8, 3, 2, 16, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        chunk_gla_triton(x["q"], x["k"], x["v"], x["gk"])
    x = make(1, 8, 2, 1, 16, 16, gv=True)
    with pytest.raises(ValueError, match="gv"):
        chunk_gla_triton(x["q"], x["k"], x["v"], x["gk"], x["gv"][..., :8])
    with pytest.raises(NotImplementedError, match="K and V must be <= 256"):
        chunk_gla_triton(x["q"], x["k"], x["v"].new_zeros(1, 8, 1, 272), x["gk"])
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gla_triton(x["q"], x["k"], x["v"], x["gk"], initial_state=torch.zeros(2, 1, 16, 16, device=DEV))
    with pytest.raises(ValueError, match="batch size 1"):
        y = make(2, 8, 1, 1, 16, 16)
        chunk_gla_triton(y["q"], y["k"], y["v"], y["gk"], cu_seqlens=torch.tensor([0, 8], device=DEV))


REC_CASES = [  # T, Hq, Hkv, gk, gv, init
    (1, 1, 1, True, False, False),
    (9, 2, 1, True, True, True),
    (12, 4, 2, False, True, True),
]


@pytest.mark.parametrize(("T", "Hq", "Hkv", "gk", "gv", "init"), REC_CASES,
                         ids=[f"T{c[0]}-Hq{c[1]}-Hkv{c[2]}-gk{int(c[3])}-gv{int(c[4])}" for c in REC_CASES])
def test_fused_recurrent_matches_naive(T, Hq, Hkv, gk, gv, init):
    x = make(2, T, Hq, Hkv, 16, 32, gk=gk, gv=gv, init=init, seed=T)
    assert_match(run(fused_recurrent_gla_triton, x), run(naive_recurrent_gla, x), ratio=1e-5, atol=1e-5)


def test_fused_recurrent_varlen():
    cu = torch.tensor([0, 0, 1, 7, 7, 12], device=DEV)
    x = make(1, 12, 2, 1, 16, 16, gv=True, init=True, N=5, seed=6)
    assert_match(run(fused_recurrent_gla_triton, x, cu=cu), run(naive_recurrent_gla, x, cu=cu), ratio=1e-5,
                 atol=1e-5)


def test_decode_steps_update_state_in_place_and_chain():
    B, T, Hq, Hkv, K, V = 2, 3, 4, 2, 16, 32
    x = make(B, T, Hq, Hkv, K, V, gv=True, init=True, seed=7)
    o_ref, s_ref = naive_recurrent_gla(x["q"], x["k"], x["v"], x["gk"], x["gv"], 0.5, x["h0"], True)
    state = x["h0"].clone()
    ptr = state.data_ptr()
    for t in range(T):
        o = fused_recurrent_gla_step_(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["gk"][:, t], state, 0.5,
                                      gv=x["gv"][:, t])
        torch.testing.assert_close(o, o_ref[:, t], atol=1e-5, rtol=1e-5)
    assert state.data_ptr() == ptr
    torch.testing.assert_close(state, s_ref, atol=1e-5, rtol=1e-5)


def test_decode_step_rejects_non_fp32_state():
    x = make(1, 1, 1, 1, 16, 16)
    with pytest.raises(ValueError, match="fp32"):
        fused_recurrent_gla_step_(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["gk"][:, 0],
                                  torch.zeros(1, 1, 16, 16, dtype=torch.float64, device=DEV))


GV_CASES = [  # T, Hq, Hkv, K, V, gk, init
    (1, 1, 1, 16, 16, False, False),
    (7, 2, 1, 16, 32, False, True),
    (65, 2, 2, 32, 16, True, True),
    (130, 2, 1, 16, 16, True, False),
]


@pytest.mark.parametrize(("T", "Hq", "Hkv", "K", "V", "gk", "init"), GV_CASES,
                         ids=[f"T{c[0]}-Hq{c[1]}-Hkv{c[2]}-K{c[3]}-V{c[4]}-{'gk+gv' if c[5] else 'gv'}-"
                              f"{'h0' if c[6] else 'zero'}" for c in GV_CASES])
def test_chunk_value_gates_match_naive(T, Hq, Hkv, K, V, gk, init):
    x = make(2 if T < 64 else 1, T, Hq, Hkv, K, V, gk=gk, gv=True, init=init, seed=T + 1)
    assert_match(run(chunk_gla_triton, x), run(naive_recurrent_gla, x), ratio=1e-5, atol=1e-5)


def test_chunk_value_gates_varlen():
    cu = torch.tensor([0, 0, 1, 66, 66, 73], device=DEV)
    x = make(1, 73, 2, 1, 16, 16, gv=True, init=True, N=5, seed=21)
    assert_match(run(chunk_gla_triton, x, cu=cu), run(naive_recurrent_gla, x, cu=cu), ratio=1e-5, atol=1e-5)


def test_chunk_value_gates_strong_decay_and_exact_diagonal(monkeypatch):
    # ~-20 per step on the value side: sub-chunk kernels, whose frames and elementwise diagonal keep exponents <= 0;
    # SPAN_MAX < 0 also sends the key side's diagonal blocks through the elementwise sum.
    monkeypatch.setattr(chunk_common, "SPAN_MAX", -1.0)
    x = make(1, 40, 2, 1, 16, 16, gk=False, gv=True, init=True, gate_div=0.05, seed=22)
    # d(gate) is a difference of O(1) terms around a tiny value here (fp32 cancellation, as for gk alone)
    assert_match(run(chunk_gla_triton, x), run(naive_recurrent_gla, x), ratio=1e-5, ratio_dg=2e-4, atol=1e-5)


def test_chunk_value_gates_sub_chunk_kernels(monkeypatch):
    # FAST_SPAN < 0: every chunk through the sub-chunk kernels (chunk_gv), both gate sides
    monkeypatch.setattr(chunk_common, "FAST_SPAN", -1.0)
    x = make(1, 70, 2, 1, 16, 32, gv=True, init=True, seed=24)
    assert_match(run(chunk_gla_triton, x), run(naive_recurrent_gla, x), ratio=1e-5, atol=1e-5)


def test_chunk_value_gates_mixed_paths(monkeypatch):
    # strong value decay in the middle chunk only: it goes to the sub-chunk kernels, the others stay on the
    # one-reference path, within one call
    from surgery.kernels.gla import chunk_fwd

    counts = []
    real = chunk_fwd.work_list
    monkeypatch.setattr(chunk_fwd, "work_list", lambda *a: counts.append(int(real(*a)[0].item())) or real(*a))
    x = make(1, 150, 2, 1, 16, 16, gv=True, init=True, gate_div=4.0, seed=25)
    x["gv"][:, 64:128] *= 40.0
    assert_match(run(chunk_gla_triton, x), run(naive_recurrent_gla, x), ratio=1e-5, ratio_dg=1e-4, atol=1e-5)
    assert counts == [1]


def test_chunk_value_gates_small_tiles(monkeypatch):
    for key in ("bki", "bv_o", "bv_dv", "bk_dqk", "bvi_dqk", "bk_u", "bv_u", "bk_s", "bv_s"):
        monkeypatch.setitem(chunk_mod.CONFIG, key, 16)
    x = make(1, 80, 2, 1, 32, 48, gv=True, init=True, seed=23)
    assert_match(run(chunk_gla_triton, x), run(naive_recurrent_gla, x), ratio=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- GPU: real head sizes

GPU_CASES = [  # dtype, T, K(=V), Hq, Hkv, B, init; few (dtype, K, group) combinations, so few compilations
    ("bf16", 1, 64, 4, 1, 2, True),
    ("fp32", 63, 64, 1, 1, 2, False),
    ("bf16", 64, 128, 4, 1, 2, True),
    ("fp32", 65, 64, 4, 4, 1, True),
    ("bf16", 65, 128, 4, 1, 1, False),
    ("bf16", 1000, 128, 4, 1, 2, True),
    ("fp32", 1000, 64, 4, 1, 1, True),
    ("bf16", 4096, 128, 8, 2, 1, True),
    ("fp32", 4096, 64, 1, 1, 1, False),
]
DT = {"bf16": torch.bfloat16, "fp32": torch.float32}
# bf16 inputs against an fp32 computation on the same (rounded) inputs; fp32 loses to tf32 products
TOL = {"bf16": (5e-3, 1e-2), "fp32": (2e-3, 5e-3)}
# fp32 inputs run their dot products in TF32 on tensor cores (10-bit mantissa). With gates on both sides the gate
# gradients sum two such products per element, and measured 5.7e-3 to 6.6e-3 relative RMSE on the H200: they get
# the bf16 gradient tolerance, outputs and the other gradients keep the fp32 ones.
TOL_BOTH_GATES_FP32 = (2e-3, 1e-2)


def reference(x, cu=None):
    """The spec for short inputs; our fp32 token loop (itself checked against the spec) for long ones."""
    T = x["q"].shape[1]
    fn = naive_recurrent_gla if T <= 65 else fused_recurrent_gla_triton
    return run(fn, x, cu=cu, upcast=True)


def cast_like(ref, x):
    """Gradients of the upcast reference carry fp32; compare dtypes against the inputs' own."""
    dt = {"dq": x["q"].dtype, "dk": x["k"].dtype, "dv": x["v"].dtype}
    return {n: (t.to(dt[n]) if n in dt and t is not None else t) for n, t in ref.items()}


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "T", "D", "Hq", "Hkv", "B", "init"), GPU_CASES,
                         ids=[f"{c[0]}-T{c[1]}-D{c[2]}-Hq{c[3]}-Hkv{c[4]}-B{c[5]}" for c in GPU_CASES])
def test_gpu_chunk(dtype, T, D, Hq, Hkv, B, init):
    x = make(B, T, Hq, Hkv, D, D, init=init, dtype=DT[dtype], seed=T + D)
    got = run(chunk_gla_triton, x)
    want = cast_like(reference(x), x)
    want["o"] = want["o"].to(got["o"].dtype)
    assert_match(got, want, *TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gpu_chunk_varlen(dtype):
    cu = torch.tensor([0, 0, 1, 300, 300, 301, 1500], device="cuda")
    D = 128 if dtype == "bf16" else 64
    x = make(1, 1500, 4, 1, D, D, init=True, N=6, dtype=DT[dtype], seed=11)
    got = run(chunk_gla_triton, x, cu=cu)
    want = cast_like(reference(x, cu), x)
    want["o"] = want["o"].to(got["o"].dtype)
    assert_match(got, want, *TOL[dtype])


@pytest.mark.gpu
def test_gpu_chunk_exact_diagonal_and_strong_decay(monkeypatch):
    x = make(1, 200, 4, 1, 128, 128, init=True, gate_div=0.05, dtype=torch.bfloat16, seed=12)
    want = cast_like(reference(x), x)
    want["o"] = want["o"].to(torch.bfloat16)
    assert_match(run(chunk_gla_triton, x), want, *TOL["bf16"])
    monkeypatch.setattr(chunk_common, "FAST_SPAN", -1.0)
    y = make(1, 200, 4, 1, 64, 64, init=True, seed=13)
    assert_match(run(chunk_gla_triton, y), reference(y), *TOL["fp32"])
    monkeypatch.setattr(chunk_common, "SPAN_MAX", -1.0)
    assert_match(run(chunk_gla_triton, y), reference(y), *TOL["fp32"])


GV_GPU_CASES = [  # dtype, T, K, gk too; V = 64 (GSA's slots)
    ("bf16", 63, 128, False),
    ("fp32", 64, 64, True),
    ("bf16", 65, 128, True),
    ("bf16", 1000, 128, False),
    ("fp32", 1000, 64, True),
    ("bf16", 4096, 128, True),
    ("fp32", 4096, 64, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "T", "K", "gk"), GV_GPU_CASES,
                         ids=[f"{c[0]}-T{c[1]}-K{c[2]}-{'gk+gv' if c[3] else 'gv'}" for c in GV_GPU_CASES])
def test_gpu_chunk_value_gates(dtype, T, K, gk):
    x = make(1, T, 4, 2, K, 64, gk=gk, gv=True, init=True, dtype=DT[dtype], seed=T + K)
    got = run(chunk_gla_triton, x)
    want = cast_like(reference(x), x)
    want["o"] = want["o"].to(got["o"].dtype)
    assert_match(got, want, *(TOL_BOTH_GATES_FP32 if dtype == "fp32" and gk else TOL[dtype]))


@pytest.mark.gpu
@pytest.mark.parametrize("save_states", [False, True])
def test_gpu_chunk_value_gates_varlen(save_states):
    cu = torch.tensor([0, 0, 1, 300, 300, 301, 1500], device="cuda")
    x = make(1, 1500, 4, 1, 128, 64, gv=True, init=True, N=6, dtype=torch.bfloat16, seed=16)
    got = run(functools.partial(chunk_gla_triton, save_states=save_states), x, cu=cu)
    want = cast_like(reference(x, cu), x)
    want["o"] = want["o"].to(got["o"].dtype)
    assert_match(got, want, *TOL["bf16"])


@pytest.mark.gpu
def test_gpu_chunk_value_gates_sub_chunk_path_and_strong_decay(monkeypatch):
    x = make(1, 1000, 4, 2, 128, 64, gv=True, init=True, gate_div=0.05, dtype=torch.bfloat16, seed=17)
    want = cast_like(reference(x), x)
    want["o"] = want["o"].to(torch.bfloat16)
    assert_match(run(chunk_gla_triton, x), want, *TOL["bf16"])
    monkeypatch.setattr(chunk_common, "FAST_SPAN", -1.0)  # every chunk on the sub-chunk kernels
    y = make(1, 1000, 4, 2, 128, 64, gv=True, init=True, dtype=torch.float32, seed=18)
    assert_match(run(chunk_gla_triton, y), reference(y), *TOL_BOTH_GATES_FP32)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gpu_fused_recurrent(dtype):
    x = make(2, 65, 4, 1, 128, 128, gv=True, init=True, dtype=DT[dtype], seed=14)
    got = run(fused_recurrent_gla_triton, x)
    want = cast_like(run(naive_recurrent_gla, x, upcast=True), x)
    want["o"] = want["o"].to(got["o"].dtype)
    assert_match(got, want, *TOL[dtype])


@pytest.mark.gpu
def test_gpu_decode_step_in_cuda_graph():
    B, Hq, Hkv, D = 8, 32, 8, 128
    x = make(B, 1, Hq, Hkv, D, D, init=True, dtype=torch.bfloat16, seed=15)
    q, k, v, g = x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["gk"][:, 0]
    state = x["h0"].clone()
    o_ref, s_ref = naive_recurrent_gla(x["q"].float(), x["k"].float(), x["v"].float(), x["gk"], None, 0.5, x["h0"],
                                       True)
    fused_recurrent_gla_step_(q, k, v, g, state.clone(), 0.5)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = fused_recurrent_gla_step_(q, k, v, g, state, 0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_rmse(o, o_ref[:, 0]) < 5e-3
    assert rel_rmse(state, s_ref) < 1e-5


def test_auto_keeps_value_gates_on_the_chunk_kernel(monkeypatch):
    """GSA's first pass (gv only) must run on the chunked Triton kernel, not fall back to the token loop."""
    import surgery.kernels.gla as gla

    calls = []
    real = gla.load_triton

    def spy(module, name):
        fn, why = real(module, name)
        return ((lambda *a, **kw: calls.append(module) or fn(*a, **kw)) if fn else None), why

    monkeypatch.setattr(gla, "auto_uses_triton", lambda q: True)
    monkeypatch.setattr(gla, "load_triton", spy)
    x = make(1, 20, 2, 1, 16, 16, gk=False, gv=True, init=True, dtype=torch.float32, seed=3)
    o, ht = gla.chunk_gla(x["q"], x["k"], x["v"], x["gk"], x["gv"], 1.0, x["h0"], True)
    ref_o, ref_ht = naive_recurrent_gla(x["q"], x["k"], x["v"], x["gk"], x["gv"], 1.0, x["h0"], True)
    assert calls == ["chunk"]
    torch.testing.assert_close(o, ref_o, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ht, ref_ht, rtol=1e-4, atol=1e-5)
