"""The parts of the Liger mixers on their own: the band attention, the three recurrences, options, the gate map.

Each recurrence is compared with a token loop written here from the formulas of liger.md (fp64), not with the
kernels it calls, so that a wrong feature map, gate or GQA grouping cannot hide behind a matching kernel.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import surgery
from surgery.mixer import MixerDimsError
from surgery.plan import PlanError
from surgery.plugins.gla import GLA
from surgery.plugins.gsa import GSA
from surgery.plugins.hgrn2 import HGRN2
from surgery.plugins.liger import LigerAttention
from surgery.plugins.pooled_key_gate import pool_rows
from surgery.sites.attention import AttentionDims, AttentionSite
from surgery.window import band_mask, sliding_window_attention
from tests.models import tiny_model

GLARecurrence, HGRN2Recurrence, GSARecurrence = GLA, HGRN2, GSA


def branch(cls: Any, options: Any, hq: int = 4, hkv: int = 2, d: int = 8) -> Any:
    """A recurrent mixer built as a branch (no projections of its own): its ``recur`` is the formula alone."""
    site = AttentionSite(0, "x", "X", AttentionDims(hq * d, hq, hkv, d, False, False, d**-0.5), "separate")
    return cls(site, cls.resolve_options(site, options), None, projections=False)


pytestmark = pytest.mark.usefixtures("one_thread")


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
    rec = branch(cls, cls.Options(**opt)).recur
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
    rec = branch(cls, cls.Options(**opt)).recur
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
        _, (state,) = branch(cls, cls.Options(**opt), 32, 8, 128).recur(q, k, v, k, None, None, True)
        assert tuple(state.shape) == (1, 8, 128, 128) and state.dtype == torch.float32
        assert state.numel() * 4 == 1 * 32 * 128 * 128
    _, (hk, hv) = branch(GSA, GSA.Options(), 32, 8, 128).recur(q, k, v, k, None, None, True)  # default: 64 slots
    assert tuple(hk.shape) == (1, 8, 128, 64) and tuple(hv.shape) == (1, 8, 64, 128)


# -- options and sites -------------------------------------------------------------------------------------


def test_liger_branch_takes_its_own_options_and_rejects_others() -> None:
    with pytest.raises(ValueError, match=r"num_slots\n.*goes under recurrent: \{mixer: NAME, options: \{num_slots"):
        LigerAttention.Options(num_slots=8)  # beside Liger's own: the old short form, which says where it goes
    with pytest.raises(ValueError, match=r"recurrent.options.lower_bound\n.*unknown key 'lower_bound'"):
        LigerAttention.Options(recurrent={"mixer": "gsa", "options": {"lower_bound": 0.5}})  # not gsa's
    with pytest.raises(ValueError, match=r"recurrent.mixer\n.*'swa' is a mixer but not a recurrent mixer; recurrent "
                                         r"mixers: gla, gsa, hgrn2, mom"):  # fmt: skip
        LigerAttention.Options(recurrent="swa")
    with pytest.raises(ValueError, match="unknown recurrent mixer 'glaa'; did you mean 'gla'"):
        LigerAttention.Options(recurrent={"mixer": "glaa"})
    short = LigerAttention.Options(recurrent="hgrn2")  # a name alone: its default options
    assert short.recurrent.options == HGRN2.Options() and short.recurrent.mixer_cls is HGRN2
    full = LigerAttention.Options(recurrent={"mixer": "hgrn2", "options": {"lower_bound": 0.5}})
    assert full.recurrent.options.lower_bound == 0.5 and full.recurrent.mixer_cls is HGRN2
    assert LigerAttention.Options().recurrent.options.gate_normalizer == 16.0  # Liger's default: gla
    again = LigerAttention.Options.model_validate(full.model_dump())  # the saved (resolved) form reloads
    assert again == full


def test_option_ranges_are_checked() -> None:
    with pytest.raises(ValueError, match="lower_bound"):
        HGRN2.Options(lower_bound=1.0)
    with pytest.raises(ValueError, match="window"):
        LigerAttention.Options(window=-1)
    with pytest.raises(ValueError, match="gate_normalizer"):
        GSA.Options(gate_normalizer=0)


def test_gsa_slots_must_divide_head_dim(registry: Any) -> None:
    rule = {"layers": "all", "mixer": "gsa", "options": {"num_slots": 6}}
    plan = {"version": 2, "model": "unused/hub-id", "convert": [rule]}
    with pytest.raises(PlanError, match=r"num_slots=6 must divide head_dim=16.*\[1, 2, 4, 8, 16\]"):
        surgery.check(surgery.load_plan(plan, registry), tiny_model("llama"))
    dims = AttentionDims(64, 4, 2, 16, False, False, 0.25)
    site = AttentionSite(0, "model.layers.0.self_attn", "X", dims, "separate")
    with pytest.raises(MixerDimsError, match="num_slots=64 must divide head_dim=16"):
        GSA.check_site(site, GSA.Options(num_slots=64))
    with pytest.raises(MixerDimsError, match="num_slots=3"):
        LigerAttention.check_site(site, LigerAttention.Options(recurrent={"mixer": "gsa", "options": {"num_slots": 3}}))
    GSA.check_site(site, GSA.Options(num_slots=16))


@pytest.mark.parametrize("head_dim,slots", [(16, 16), (64, 64), (96, 48), (128, 64), (80, 40)])
def test_gsa_default_slots_fit_the_head_dim_and_are_recorded(head_dim: int, slots: int, registry: Any) -> None:
    dims = AttentionDims(4 * head_dim, 4, 2, head_dim, False, False, head_dim**-0.5)
    site = AttentionSite(0, "model.layers.0.self_attn", "X", dims, "separate")
    resolved = GSA.resolve_options(site, GSA.Options())
    assert resolved.num_slots == slots
    GSA.check_site(site, resolved)
    nested = LigerAttention.resolve_options(site, LigerAttention.Options(recurrent="gsa"))
    assert nested.recurrent.options.num_slots == slots
    if head_dim == 16:  # the manifest of a converted tiny model records the choice
        plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [{"mixer": "gsa"}]}, registry)
        model = surgery.convert(plan, tiny_model("llama"))
        assert {r.options["num_slots"] for r in model.surgery.manifest} == {16}


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
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]}, registry)
    with pytest.raises(ValueError, match="gate: projection"):
        surgery.convert(plan, tiny_model("llama"))
    bad = {"layers": "all", "mixer": "swa", "weights": "pooled_key_gate"}
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [bad]}, registry)
    with pytest.raises(PlanError, match=r"convert.0.weights: layer 0: weight map 'pooled_key_gate' needs a module "
                                        r"'g_proj' \(build the mixer with gate: projection\)"):  # fmt: skip
        surgery.check(plan, tiny_model("llama"))  # on the meta-device check, before weights


def test_pooled_key_gate_fills_liger_branch_gate(registry: Any) -> None:
    rule = {"mixer": "liger_attention", "options": {"recurrent": {"mixer": "gla", "options": {"gate": "projection"}}},
            "weights": "pooled_key_gate"}  # fmt: skip
    model = tiny_model("llama")
    k_w = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]}, registry)
    mixer = surgery.convert(plan, model).model.layers[0].self_attn
    assert torch.equal(mixer.recurrent.g_proj.weight, k_w)


def test_pooled_key_gate_pools_weight_and_bias(registry: Any) -> None:
    rule = {"layers": [0], "mixer": "hgrn2", "options": {"gate": "projection"}, "weights": "pooled_key_gate",
            "weight_options": {"pool_size": 4}}  # fmt: skip
    model = tiny_model("qwen2")  # k_proj has a bias
    k_w = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    k_b = model.model.layers[0].self_attn.k_proj.bias.detach().clone()
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]}, registry)
    mixer = surgery.convert(plan, model).model.layers[0].self_attn
    torch.testing.assert_close(mixer.g_proj.weight, pool_rows(k_w, 2, 16, 4))
    torch.testing.assert_close(mixer.g_proj.bias, pool_rows(k_b, 2, 16, 4))
    assert torch.equal(mixer.k_proj.weight, k_w)


def test_null_column_joins_the_softmax_under_one_normalizer() -> None:
    """The marker key of ``combine: shared``: the window's keys and one extra logit per query share one softmax;
    the last output column is that logit's weight (checked against the dense formula, with cached keys and GQA)."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, T, S, D, W = 2, 4, 2, 9, 12, 8, 3
    q, k, v = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    logits = torch.randn(B, Hq, T, generator=g) * 2
    out = sliding_window_attention(q, k, v, W, 0.3, null_logits=logits, block=4)
    assert out.shape == (B, Hq, T, D + 1)
    kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    s = torch.einsum("bhtd,bhsd->bhts", q, kk) * 0.3
    pos, key = torch.arange(S - T, S)[:, None], torch.arange(S)[None]
    s = s.masked_fill(~((key <= pos) & (key >= pos - W)), float("-inf"))
    w = torch.cat([s, logits[..., None]], -1).softmax(-1)
    torch.testing.assert_close(out[..., :D], torch.einsum("bhts,bhsd->bhtd", w[..., :-1], vv), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[..., D], w[..., -1], rtol=1e-5, atol=1e-6)
    # Decoding (one query over a cache no longer than the window) takes another path: same numbers.
    one = sliding_window_attention(q[:, :, -1:], k[:, :, -W - 1:], v[:, :, -W - 1:], W, 0.3, null_logits=logits[..., -1:])
    torch.testing.assert_close(one, out[:, :, -1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory", [0, 6])
def test_shared_combine_spans_softmax_alone_to_the_normalized_recurrence(memory: int, registry: Any) -> None:
    """``combine: shared`` at a very low log-gain is the softmax side alone (window, sinks, memory), exactly as
    ``combine: fixed`` with w_rec 0; at a very high one, the normalized recurrent branch ``phi(q)^T S / phi(q)^T z``."""
    x = torch.randint(3, 160, (2, 23), generator=torch.Generator().manual_seed(1))
    base = {"window": 3, "sinks": 1, "memory": memory, "memory_chunk": 4} if memory else {"window": 3, "sinks": 1}

    def logits(opts: dict[str, Any]) -> torch.Tensor:
        rule = {"layers": "all", "mixer": "liger_attention", "options": {**base, **opts}}
        plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]}, registry)
        with torch.no_grad():
            return surgery.convert(plan, tiny_model("llama"))(x).logits

    soft = logits({"w_swa": 1.0, "w_rec": 0.0})
    torch.testing.assert_close(logits({"combine": "shared", "shared_bias": -30.0}), soft, rtol=1e-5, atol=1e-5)
    high = logits({"combine": "shared", "shared_bias": 30.0})
    assert (high - soft).abs().max() > 1e-2  # the recurrent term took over
    mid = logits({"combine": "shared", "shared_bias": 0.0})
    assert torch.isfinite(mid).all() and (mid - soft).abs().max() > 1e-4 and (mid - high).abs().max() > 1e-4


def test_shared_combine_refuses_the_fixed_weights(registry: Any) -> None:
    rule = {"layers": "all", "mixer": "liger_attention", "options": {"combine": "shared", "w_rec": 0.3}}
    with pytest.raises(PlanError, match="w_rec belong to combine: fixed"):
        surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]}, registry)
    rule["options"] = {"shared_bias": 1.0}
    with pytest.raises(PlanError, match="shared_bias belongs to combine: shared"):
        surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]}, registry)
