"""The parts of the Liger mixers on their own: the band attention, the three recurrences, options, the gate map.

Each recurrence is compared with a token loop written here from the formulas of liger.md (fp64), not with the
kernels it calls, so that a wrong feature map, gate or GQA grouping cannot hide behind a matching kernel.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import surgery
from surgery.attention import AttentionDims, AttentionSite
from surgery.mixer import MixerDimsError
from surgery.plan import PlanError
from surgery.plugins._recurrent import GLARecurrence, GSARecurrence, HGRN2Recurrence
from surgery.plugins._swa import band_mask, sliding_window_attention
from surgery.plugins.gsa import GSA
from surgery.plugins.hgrn2 import HGRN2
from surgery.plugins.liger import LigerAttention
from surgery.plugins.weight_maps_liger import pool_rows
from tests.models import tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- sliding-window attention -------------------------------------------------------------------------------


def dense_window_reference(q, k, v, window, scale, valid=None, softcap=None):  # noqa: ANN001, ANN201
    """Full [T, S] scores with an explicit window mask, fp64; the last T of S keys are the queries' own."""
    B, Hq, T, _ = q.shape
    S, G = k.shape[2], Hq // k.shape[1]
    k, v = k.repeat_interleave(G, 1).double(), v.repeat_interleave(G, 1).double()
    s = q.double() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    p = torch.arange(T)[:, None] + S - T
    j = torch.arange(S)[None]
    allowed = ((j <= p) & (j >= p - window))[None, None].expand(B, 1, T, S)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    allowed = allowed | (j == p)
    return (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).float()


@pytest.mark.parametrize(
    "T,S,window,block",
    [(37, 37, 5, 8), (1, 9, 5, 64), (1, 3, 5, 64), (7, 20, 5, 3), (10, 10, 64, 64), (130, 130, 64, 64), (6, 6, 0, 4)],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "leftpad"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "softcap"])
def test_band_attention_matches_dense_reference(
    T: int, S: int, window: int, block: int, padded: bool, softcap: Any
) -> None:
    g = torch.Generator().manual_seed(T * 100 + S)
    q, k, v = (torch.randn(2, h, n, 8, generator=g) for h, n in ((4, T), (2, S), (2, S)))
    valid = None
    if padded:
        valid = torch.ones(2, S, dtype=torch.bool)
        valid[1, : min(3, S - 1)] = False
    out = sliding_window_attention(q, k, v, window, 0.3, key_valid=valid, softcap=softcap, block=block)
    ref = dense_window_reference(q, k, v, window, 0.3, valid, softcap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_query_t_sees_exactly_keys_t_minus_window_to_t() -> None:
    """(f) Zero scores make the output the mean of the visible values; one-hot values show which those are."""
    T, window = 40, 6
    q = torch.zeros(1, 1, T, 4)
    v = torch.eye(T)[None, None]  # value j is e_j
    valid = torch.ones(1, T, dtype=torch.bool)
    valid[0, :3] = False  # left padding: tokens 0-2
    out = sliding_window_attention(q, q.clone(), v, window, 1.0, key_valid=valid, block=8)[0, 0]
    for t in range(3, T):
        seen = set(torch.nonzero(out[t]).flatten().tolist())
        assert seen == set(range(max(3, t - window), t + 1)), t
        assert torch.allclose(out[t][sorted(seen)], torch.tensor(1.0 / len(seen)))


def test_band_mask_is_the_window_relative_to_each_block() -> None:
    m = band_mask(4, 3)
    assert m.shape == (4, 7)
    # local query r sees local keys r .. r + 3: the 3 keys before it in absolute terms, and itself
    seen = [torch.nonzero(row).flatten().tolist() for row in m]
    assert seen == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]]


# -- recurrences --------------------------------------------------------------------------------------------


def loop_reference(kind: str, q, k, v, **opt):  # noqa: ANN001, ANN003, ANN201
    """The recurrences of liger.md section 2, one token at a time in fp64, query heads grouped onto kv heads."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, T, Hq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kv = h // G
            S = S2 = None
            for t in range(T):
                qt, kt, vt = q[b, t, h], k[b, t, kv], v[b, t, kv]
                if kind == "gla":
                    alpha = torch.sigmoid(kt) ** (1.0 / opt["gate_normalizer"])
                    S = (0 if S is None else alpha[:, None] * S) + torch.outer(kt.softmax(-1), vt)
                    out[b, t, h] = qt.softmax(-1) @ S
                elif kind == "hgrn2":
                    lb = opt["lower_bound"]
                    alpha = lb + (1 - lb) * torch.sigmoid(kt)
                    S = (0 if S is None else alpha[:, None] * S) + torch.outer(1 - alpha, vt)
                    out[b, t, h] = qt.softmax(-1) @ S
                else:  # gsa
                    m = opt["num_slots"]
                    alpha = torch.sigmoid(kt.view(m, -1).mean(-1)) ** (1.0 / opt["gate_normalizer"])
                    s = 1 - alpha
                    S = (0 if S is None else S * alpha[None, :]) + torch.outer(kt, s)  # [D, M]
                    S2 = (0 if S2 is None else alpha[:, None] * S2) + torch.outer(s, vt)  # [M, D]
                    out[b, t, h] = (qt @ S).softmax(-1) @ S2
    return out


RECURRENCES = [
    ("gla", GLARecurrence, {"gate_normalizer": 16.0}),
    ("gla-n4", GLARecurrence, {"gate_normalizer": 4.0}),
    ("hgrn2", HGRN2Recurrence, {"lower_bound": 0.0}),
    ("hgrn2-lb", HGRN2Recurrence, {"lower_bound": 0.4}),
    ("gsa", GSARecurrence, {"num_slots": 4, "gate_normalizer": 16.0}),
    ("gsa-identity-pool", GSARecurrence, {"num_slots": 8, "gate_normalizer": 2.0}),
]


@pytest.mark.parametrize("name,cls,opt", RECURRENCES, ids=[r[0] for r in RECURRENCES])
def test_recurrence_matches_the_formula(name: str, cls: Any, opt: dict) -> None:
    g = torch.Generator().manual_seed(0)
    # T = 70 crosses a 64-token chunk; keys scaled so that gates spread over (0, 1)
    q, k, v = (torch.randn(2, 70, h, 8, generator=g) for h in (4, 2, 2))
    k = 3 * k
    rec = cls(cls.Options(**opt))
    out, state = rec(q, k, v, k, None, None, True)
    torch.testing.assert_close(out.double(), loop_reference(cls.name, q, k, v, **opt), rtol=1e-4, atol=1e-4)
    # continuing from the final state of a prefix gives the same as one pass (the decode path)
    o1, s1 = rec(q[:, :50], k[:, :50], v[:, :50], k[:, :50], None, None, True)
    o2, _ = rec(q[:, 50:51], k[:, 50:51], v[:, 50:51], k[:, 50:51], None, s1, True)
    torch.testing.assert_close(o2, out[:, 50:51], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,cls,opt", RECURRENCES[::2], ids=[r[0] for r in RECURRENCES[::2]])
def test_left_padding_leaves_the_state_untouched(name: str, cls: Any, opt: dict) -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 12, h, 8, generator=g) for h in (4, 2, 2))
    rec = cls(cls.Options(**opt))
    junk = [torch.randn(1, 5, *x.shape[2:], generator=g) * 9 for x in (q, k, v)]
    qp, kp, vp = (torch.cat([j, x], 1) for j, x in zip(junk, (q, k, v)))
    valid = torch.ones(1, 17, dtype=torch.bool)
    valid[0, :5] = False
    o_pad, s_pad = rec(qp, kp, vp, kp, valid, None, True)
    o, s = rec(q, k, v, k, None, None, True)
    torch.testing.assert_close(o_pad[:, 5:], o)
    for a, b in zip(s_pad, s):
        torch.testing.assert_close(a, b)


def test_llama3_8b_dims_keep_one_state_per_kv_head() -> None:
    """(e) Hq = 32, Hkv = 8, D = 128: the state is [B, 8, 128, 128], 4x smaller than one per query head."""
    q, k, v = torch.randn(1, 2, 32, 128), torch.randn(1, 2, 8, 128), torch.randn(1, 2, 8, 128)
    for cls, opt in ((GLARecurrence, {}), (HGRN2Recurrence, {})):
        _, (state,) = cls(cls.Options(**opt))(q, k, v, k, None, None, True)
        assert tuple(state.shape) == (1, 8, 128, 128) and state.dtype == torch.float32
        assert state.numel() * 4 == 1 * 32 * 128 * 128
    _, (hk, hv) = GSARecurrence(GSARecurrence.Options(num_slots=64))(q, k, v, k, None, None, True)
    assert tuple(hk.shape) == (1, 8, 128, 64) and tuple(hv.shape) == (1, 8, 64, 128)


# -- options and sites -------------------------------------------------------------------------------------


def test_liger_rejects_knobs_of_another_recurrence() -> None:
    with pytest.raises(ValueError, match="num_slots does not apply to recurrent: gla"):
        LigerAttention.Options(num_slots=8)
    with pytest.raises(ValueError, match="lower_bound does not apply to recurrent: gsa"):
        LigerAttention.Options(recurrent="gsa", lower_bound=0.5)
    opts = LigerAttention.Options(recurrent="hgrn2", lower_bound=0.5)
    assert opts.recurrence_options().lower_bound == 0.5
    assert LigerAttention.Options().recurrence_options().gate_normalizer == 16.0  # Liger's default


def test_option_ranges_are_checked() -> None:
    with pytest.raises(ValueError, match="lower_bound"):
        HGRN2.Options(lower_bound=1.0)
    with pytest.raises(ValueError, match="window"):
        LigerAttention.Options(window=-1)
    with pytest.raises(ValueError, match="gate_normalizer"):
        GSA.Options(gate_normalizer=0)


def test_gsa_slots_must_divide_head_dim(registry: Any) -> None:
    rule = {"layers": "all", "mixer": "gsa", "options": {"num_slots": 6}}
    plan = {"version": 1, "model": "unused/hub-id", "convert": [rule]}
    with pytest.raises(PlanError, match=r"num_slots=6 must divide head_dim=16.*\[1, 2, 4, 8, 16\]"):
        surgery.check(surgery.load_plan(plan, registry), tiny_model("llama"), registry=registry)
    dims = AttentionDims(64, 4, 2, 16, False, False, 0.25)
    site = AttentionSite(0, "model.layers.0.self_attn", "X", dims, "separate")
    with pytest.raises(MixerDimsError, match="num_slots=64 must divide head_dim=16"):
        GSA.check_site(site, GSA.Options())  # the default 64 slots need head_dim >= 64
    with pytest.raises(MixerDimsError, match="num_slots=3"):
        LigerAttention.check_site(site, LigerAttention.Options(recurrent="gsa", num_slots=3))
    GSA.check_site(site, GSA.Options(num_slots=16))


# -- the pooled gate map -----------------------------------------------------------------------------------


def test_pool_rows_averages_adjacent_key_dims_per_head() -> None:
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)  # 2 kv heads of 8 dims, 3 inputs
    p = pool_rows(w, num_kv_heads=2, head_dim=8, pool_size=4)
    assert p.shape == w.shape
    for row in range(16):
        group = (row // 2) * 2
        torch.testing.assert_close(p[row], w[group : group + 2].mean(0))
    assert torch.equal(pool_rows(w, 2, 8, 8), w)  # pool_size == head_dim: identity


def test_pooled_key_gate_needs_a_gate_projection(registry: Any) -> None:
    rule = {"layers": "all", "mixer": "gla", "weights": "pooled_key_gate"}
    plan = surgery.load_plan({"version": 1, "model": "unused/hub-id", "convert": [rule]}, registry)
    with pytest.raises(ValueError, match="gate: projection"):
        surgery.convert(plan, tiny_model("llama"), registry=registry)
    bad = {"layers": "all", "mixer": "swa", "weights": "pooled_key_gate"}
    with pytest.raises(PlanError, match="does not fit mixer 'swa'"):
        surgery.load_plan({"version": 1, "model": "unused/hub-id", "convert": [bad]}, registry)


def test_pooled_key_gate_pools_weight_and_bias(registry: Any) -> None:
    rule = {"layers": [0], "mixer": "hgrn2", "options": {"gate": "projection"}, "weights": "pooled_key_gate",
            "weight_options": {"pool_size": 4}}  # fmt: skip
    model = tiny_model("qwen2")  # k_proj has a bias
    k_w = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    k_b = model.model.layers[0].self_attn.k_proj.bias.detach().clone()
    plan = surgery.load_plan({"version": 1, "model": "unused/hub-id", "convert": [rule]}, registry)
    mixer = surgery.convert(plan, model, registry=registry).model.layers[0].self_attn
    torch.testing.assert_close(mixer.g_proj.weight, pool_rows(k_w, 2, 16, 4))
    torch.testing.assert_close(mixer.g_proj.bias, pool_rows(k_b, 2, 16, 4))
    assert torch.equal(mixer.k_proj.weight, k_w)
