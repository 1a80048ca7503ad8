"""Recall: the probes, attention sinks, the retrieval memory and window dropout (what the conformance suite does
not already check: prefill/decode parity, padding, save/load and gradients of every option set run there)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import surgery
from surgery.demo import tasks
from surgery.generate import cache_kwarg
from surgery.retrieval import consolidate
from surgery.window import sliding_window_attention, update_sinks
from tests.models import tiny_model


def _convert(mixer: str, options: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id",
                              "convert": [{"layers": "all", "mixer": mixer, "options": options}]})  # fmt: skip
    return surgery.convert(plan, tiny_model("llama"))


def _ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- probes


@pytest.mark.parametrize("n_tokens", [1024, 4096])
def test_passkey_depths_spread_over_the_context(n_tokens: int) -> None:
    items = tasks.passkey_items(n_tokens=n_tokens)
    depths = sorted(it["depth"] for it in items)
    assert len(items) == 20 and depths[0] < 0.1 and depths[-1] > 0.9
    assert max(b - a for a, b in zip(depths, depths[1:])) < 0.1  # stratified: no large unprobed stretch
    for it in items:
        assert it["prompt"].count("#" + it["passkey"]) == 2 and it["target"] == it["passkey"]


def test_multikey_items_ask_for_one_of_several_keys() -> None:
    items = tasks.multikey_items(n_tokens=1024, n_keys=4)
    assert len(items) == 20 and len({it["asked"] for it in items}) > 2
    for it in items:
        assert len(it["keys"]) == 4 and it["keys"][it["asked"]] == it["passkey"]
        for name, key in it["keys"].items():
            assert it["prompt"].count(f"The {name} pass key is #{key}.") == 1
        assert it["prompt"].endswith(f"What is the {it['asked']} pass key? The {it['asked']} pass key is #")
    with pytest.raises(ValueError, match="n_keys"):
        tasks.multikey_items(n_keys=1)


# ---------------------------------------------------------------------------------------------- sinks


def test_sinks_are_the_first_real_tokens_of_each_row() -> None:
    B, H, T, D = 2, 1, 6, 2
    keys = torch.arange(T, dtype=torch.float32).view(1, 1, T, 1).expand(B, H, T, D).clone()
    valid = torch.tensor([[True] * 6, [False, False, False, True, True, True]])
    aux = update_sinks(None, keys, keys, valid, seen=0, n=2)
    assert aux["sink_pos"].tolist() == [[0, 1], [3, 4]] and aux["sink_ok"].all()
    assert aux["sink_k"][1, 0, :, 0].tolist() == [3.0, 4.0]
    # Row 1 had only one real token so far: the next call fills its second sink, row 0 keeps its own.
    valid = torch.tensor([[True] * 6, [False] * 5 + [True]])
    first = update_sinks(None, keys, keys, valid, seen=0, n=2)
    assert first["sink_ok"].tolist() == [[True, True], [True, False]]
    more = update_sinks(first, keys[:, :, :1] + 10, keys[:, :, :1] + 10, None, seen=6, n=2)
    assert more["sink_pos"].tolist() == [[0, 1], [5, 6]] and more["sink_k"][1, 0, 1, 0].item() == 10.0


def test_window_with_sinks_is_masked_full_attention() -> None:
    torch.manual_seed(0)
    B, Hq, Hkv, T, D, W = 2, 4, 2, 19, 8, 3
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    n = 2
    pos = torch.arange(T)
    seen = (pos[None, :] <= pos[:, None]) & ((pos[:, None] - pos[None, :] <= W) | (pos[None, :] < n))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=0.3, enable_gqa=True)
    aux = update_sinks(None, k, v, None, seen=0, n=n)
    visible = aux["sink_ok"][:, None, :] & (aux["sink_pos"][:, None, :] < (pos - W)[None, :, None])
    out = sliding_window_attention(q, k, v, W, 0.3, block=4, extra=(aux["sink_k"], aux["sink_v"], visible))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sinks_change_late_outputs_only() -> None:
    x = _ids(1, 20)
    with torch.no_grad():
        plain = _convert("swa", {"window": 4})(x).logits
        sinks = _convert("swa", {"window": 4, "sinks": 2})(x).logits
    # Query p sees p-4 ... p: sink 0 leaves the window at p = 5, and only then is it an extra key.
    torch.testing.assert_close(sinks[:, :5], plain[:, :5], rtol=0, atol=0)
    assert (sinks[:, 5:] - plain[:, 5:]).abs().amax(-1).min() > 1e-5


# ---------------------------------------------------------------------------------------------- memory


def test_a_memory_that_holds_everything_is_full_attention() -> None:
    """With room for every past token, window + memory sees the whole prefix: liger with a window as long as the
    sequence, exactly."""
    x = _ids(2, 23)
    with torch.no_grad():
        full = _convert("liger_attention", {"window": 64})(x).logits
        mem = _convert("liger_attention", {"window": 2, "memory": 32, "memory_chunk": 3})(x).logits
        small = _convert("liger_attention", {"window": 2, "memory": 2, "memory_chunk": 3})(x).logits
    torch.testing.assert_close(mem, full, rtol=1e-4, atol=2e-5)
    assert (small - full).abs().max() > 1e-4


def test_a_memory_that_holds_everything_is_full_attention_across_calls_and_left_padding() -> None:
    """The memory's readers stop at the slots that can be filled (``retrieval.filled``, from positions and padding):
    with rows padded differently and the text fed in two calls through the cache, no kept pair is cut off."""
    x = _ids(2, 23)
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        full = _convert("liger_attention", {"window": 64})(x, attention_mask=mask).logits
        model = _convert("liger_attention", {"window": 2, "memory": 32, "memory_chunk": 3})
        name = cache_kwarg(model)
        first = model(x[:, :11], attention_mask=mask[:, :11], use_cache=True)
        rest = model(x[:, 11:], attention_mask=mask, use_cache=True, **{name: first.past_key_values})
    mem = torch.cat([first.logits, rest.logits], 1)
    real = mask.bool()
    torch.testing.assert_close(mem[real], full[real], rtol=1e-4, atol=2e-5)


def test_consolidate_keeps_kept_pairs_first_in_order_of_arrival() -> None:
    """Empty slots go last whatever their place before, so a reader may stop at the count of fillable slots."""
    torch.manual_seed(0)
    K = 4
    v = torch.randn(1, 1, 6, K)
    both = {"k": torch.arange(6.0).view(1, 1, 6, 1), "v": v, "fk": torch.randn(1, 1, 6, K),
            "ok": torch.tensor([[[False, True, False, True, True, False]]])}  # fmt: skip
    mem = {name: t[:, :, :3] for name, t in both.items()}  # slots: empty, pair 1, empty
    cand = {name: t[:, :, 3:] for name, t in both.items()}  # pairs 3, 4 and a padding slot
    out = consolidate(mem, cand, torch.randn(1, 1, K, K), 5)
    assert out["ok"][0, 0].tolist() == [True, True, True, False, False]
    assert out["k"][0, 0, :3, 0].tolist() == [1.0, 3.0, 4.0]


def test_consolidate_keeps_the_pairs_the_state_recalls_worst() -> None:
    B, H, K = 1, 1, 4
    eye = torch.eye(K)
    state = eye[None, None].clone()  # reconstructs v = fk exactly
    fk = eye[None, None]  # 4 pairs, one-hot features
    v = eye[None, None].clone()
    v[0, 0, 1] = -v[0, 0, 1]  # pair 1: reconstruction points the wrong way (score 2)
    v[0, 0, 3] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # pair 3: half wrong (score 1 - 1/sqrt 2)
    cand = {"k": v.clone(), "v": v, "fk": fk, "ok": torch.ones(B, H, K, dtype=torch.bool)}
    empty = {"k": v[:, :, :0], "v": v[:, :, :0], "fk": fk[:, :, :0], "ok": cand["ok"][:, :, :0]}
    mem = consolidate(empty, cand, state, 2)
    assert mem["v"][0, 0].tolist() == [v[0, 0, 1].tolist(), v[0, 0, 3].tolist()] and mem["ok"].all()
    cand["ok"][0, 0, 1] = False  # padding never enters
    mem = consolidate(empty, cand, state, 2)
    kept = mem["v"][0, 0].tolist()
    assert v[0, 0, 3].tolist() in kept and v[0, 0, 1].tolist() not in kept


def test_consolidate_breaks_ties_between_repeated_pairs_by_age_not_by_rounding() -> None:
    """A token repeated in one chunk gives two pairs with the same features and value (keys differ by RoPE): they
    score alike up to rounding noise (prefill and decode states differ in the last bits), and the older pair is
    kept whichever way the noise goes, so decoding selects what prefill selected."""
    torch.manual_seed(0)
    state = torch.randn(1, 1, 8, 8)
    fk = torch.randn(1, 1, 3, 8)
    v = torch.randn(1, 1, 3, 8)
    v[:, :, 0] = fk[0, 0, 0] @ state[0, 0]  # reconstructed exactly (score 0): pair 1 is the worse ...
    fk[:, :, 2], v[:, :, 2] = fk[:, :, 1], v[:, :, 1]  # ... and the same token again, later in the chunk
    kept = []
    for sign in (1.0, -1.0):
        cand = {"k": torch.arange(3.0).view(1, 1, 3, 1).expand(1, 1, 3, 8), "v": v.clone(), "fk": fk.clone(),
                "ok": torch.ones(1, 1, 3, dtype=torch.bool)}  # fmt: skip
        toward = fk[0, 0, 1] @ state[0, 0]  # moving the value toward its reconstruction lowers the score
        cand["v"][:, :, 2] += sign * 1e-5 * toward  # noise on the repeat's score, either way
        empty = {name: t[:, :, :0] for name, t in cand.items()}
        kept.append(consolidate(empty, cand, state, 1)["k"][0, 0, 0, 0].item())
    assert kept == [1.0, 1.0]


def test_memory_without_the_recurrent_output_keeps_what_it_would_keep(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``w_rec: 0`` the state only scores pairs: it advances without its output (``RecurrentMixer.advance``),
    which chooses the same memory as the full recurrence, prefill and decode alike."""
    from surgery.recurrent import RecurrentMixer

    opts = {"window": 2, "sinks": 1, "memory": 3, "memory_chunk": 3, "w_swa": 1.0, "w_rec": 0.0}
    x = _ids(2, 29)
    model = _convert("liger_attention", opts)
    calls = []
    full = RecurrentMixer.recurrent_output
    monkeypatch.setattr(RecurrentMixer, "recurrent_output", lambda *a: calls.append(1) or full(*a))
    with torch.no_grad():
        fast = model(x).logits
        assert not calls  # no output was computed
        with_output = lambda self, *a: RecurrentMixer.recurrent_output(self, *a, True)[1]  # noqa: E731
        monkeypatch.setattr(RecurrentMixer, "advance", with_output)
        slow = model(x).logits
        assert calls
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        cache, name, steps = None, cache_kwarg(model), []
        for t in range(x.shape[1]):  # token by token: the same memory, the same logits
            out = model(x[:, t : t + 1], use_cache=True, **{name: cache})
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), fast, rtol=1e-4, atol=1e-4)


def test_memory_needs_the_gla_branch() -> None:
    with pytest.raises(Exception, match="recurrent: gla"):  # a PlanError naming the rule
        _convert("liger_attention", {"memory": 4, "recurrent": "hgrn2"})


# ---------------------------------------------------------------------------------------------- window dropout


def test_window_dropout_is_train_time_only() -> None:
    x = _ids(2, 12)
    model = _convert("liger_attention", {"window": 2, "window_dropout": 1.0})
    ref = _convert("liger_attention", {"window": 2})
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=0)  # eval: no dropout
        model.train()
        rec_only = _convert("liger_attention", {"window": 2, "w_swa": 0.0, "w_rec": 1.0})
        torch.testing.assert_close(model(x).logits, rec_only(x).logits, rtol=1e-5, atol=1e-6)
