"""Attention extras (``surgery.sites.attention_extras``): sink logits, output gates, pre-output norms, output biases.

Each kind is read from a tiny model of a family that has it, copied by ``copy_qkvo`` and reproduced: bit for bit by
the softmax mixer, and inside the window softmax of ``swa``/``liger_attention`` for the sink logits.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import surgery
from benchmarks.coverage import tiny_model
from surgery.registry import load_registry
from surgery.sites.attention import AttentionReadError, find_attention, read_weights
from surgery.window import sliding_window_attention


@pytest.fixture(autouse=True, scope="module")
def _quiet_one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def registry() -> Any:
    return load_registry(autoload=False)


def _convert(model: nn.Module, registry: Any, mixer: str, options: dict[str, Any] | None = None) -> nn.Module:
    rule = {"layers": "all", "mixer": mixer, "options": options or {}}
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]}, registry)
    return surgery.convert(plan, copy.deepcopy(model))


def _ids(vocab: int = 160) -> Tensor:
    return torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(0))


# -- reading ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "per_head", "activation", "head_bias"),
    [("afmoe", False, "sigmoid", False), ("laguna", True, "softplus", False), ("beam", False, "sigmoid", True)],
)
def test_output_gate_is_read(model_type: str, per_head: bool, activation: str, head_bias: bool) -> None:
    model = tiny_model(model_type)
    site = find_attention(model)[0]
    gate = site.extras.gate
    assert (gate.per_head, gate.activation, gate.head_bias) == (per_head, activation, head_bias)
    module = model.get_submodule(site.path)
    weights = read_weights(module, site)
    own = getattr(module, "gate_proj", None) or module.g_proj
    assert weights["out_gate.weight"] is not None and torch.equal(weights["out_gate.weight"], own.weight)
    assert ("out_gate_head_bias" in weights) == head_bias


@pytest.mark.parametrize("model_type", ["flint", "granite_swa", "gpt_oss"])
def test_sink_logits_are_read_with_the_family_eager_function(model_type: str) -> None:
    model = tiny_model(model_type)
    for site in find_attention(model):
        module = model.get_submodule(site.path)
        assert site.extras.sink_logits and site.extras.gate is None
        assert torch.equal(read_weights(module, site)["sink_logits"], module.sinks)
        assert site.extras.eager.__module__ == type(module).__module__


def test_pre_output_norm_and_separate_bias_are_read() -> None:
    bitnet = find_attention(tiny_model("bitnet"))[0]
    assert bitnet.extras.o_norm is not None and not bitnet.extras.returns_bias
    japanese = tiny_model("gpt_neox_japanese")
    first, last = find_attention(japanese)
    # Only the last layer owns dense_bias, but every layer returns it (None or not) for its decoder layer to add.
    assert (first.extras.o_bias, last.extras.o_bias) == (False, True)
    assert first.extras.returns_bias and last.extras.returns_bias
    weights = read_weights(japanese.get_submodule(last.path), last)
    assert torch.equal(weights["o_bias"], japanese.get_submodule(last.path).dense_bias)


def test_nope_layers_follow_the_rotary_condition_of_their_forward() -> None:
    # Flint rotates only on sliding-window layers ("if self.sliding_window is not None").
    sites = find_attention(tiny_model("flint"))
    rotates = [s.rotary.convention != "none" for s in sites]
    assert rotates == [s.dims.sliding_window is not None for s in sites]
    assert set(rotates) == {True, False}


class _GatedAttention(nn.Module):
    """A layer with an output gate whose forward names no activation the reader knows."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(16, 16) for _ in range(4))
        self.gate_proj = nn.Linear(16, 16)
        self.head_dim = 8

    def forward(self, x: Tensor) -> Tensor:
        return self.o_proj(self.v_proj(x) * torch.tanh(self.gate_proj(x)))


def test_gate_with_an_unknown_activation_is_refused_naming_the_module() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].self_attn = _GatedAttention()
    with pytest.raises(AttentionReadError, match=r"layers\.0\.self_attn.*_GatedAttention.*gate_proj.*sigmoid"):
        find_attention(model)


# -- reproducing ------------------------------------------------------------------------------------------


EXTRA_FAMILIES = ["flint", "granite_swa", "afmoe", "laguna", "beam", "bitnet", "gpt_neox_japanese"]


@pytest.mark.parametrize("model_type", EXTRA_FAMILIES)
def test_softmax_mixer_reproduces_the_extras_bit_for_bit(model_type: str, registry: Any) -> None:
    model = tiny_model(model_type)
    converted = _convert(model, registry, "softmax")
    with torch.no_grad():
        assert torch.equal(converted(_ids()).logits, model(_ids()).logits)
    # Changing an extra changes the logits: the mixer really applies them.
    mixer = converted.get_submodule(find_attention(model)[-1].path)
    extras = ("sink_logits", "out_gate", "o_norm", "o_bias")
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name.split(".")[0] in extras:
                p.mul_(0.5).add_(0.3)
        assert not torch.equal(converted(_ids()).logits, model(_ids()).logits)


@pytest.mark.parametrize("model_type", ["flint", "granite_swa"])
def test_window_softmax_keeps_the_sink_logits(model_type: str, registry: Any) -> None:
    """``swa`` with a window longer than the sequence is the pretrained attention, sinks included."""
    model = tiny_model(model_type)
    converted = _convert(model, registry, "swa", {"window": 16})
    with torch.no_grad():
        ref, got = model(_ids()).logits, converted(_ids()).logits
        assert torch.allclose(got, ref, atol=1e-5)
        for name, p in converted.named_parameters():
            if name.endswith("sink_logits"):
                p.fill_(-1e4)  # no mass on the sink: a plain window softmax
        assert not torch.allclose(converted(_ids()).logits, ref, atol=1e-3)


def _dense_reference(q: Tensor, k: Tensor, v: Tensor, window: int, sink: Tensor, valid: Tensor | None) -> Tensor:
    """Causal window softmax with a sink logit column, on a full score matrix; q ``[B, Hq, T, D]``."""
    B, Hq, T, _ = q.shape
    S, G = k.shape[2], Hq // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scores = q @ k.transpose(-1, -2) * 0.25
    pos_q = torch.arange(S - T, S)[:, None]
    pos_k = torch.arange(S)[None, :]
    ok = (pos_k <= pos_q) & (pos_k >= pos_q - window)
    ok = ok[None, None] if valid is None else ok[None, None] & (valid[:, None, None, :] | (pos_k == pos_q))
    scores = scores.masked_fill(~ok, float("-inf"))
    scores = torch.cat([scores, sink.view(1, Hq, 1, 1).expand(B, Hq, T, 1)], dim=-1)
    return scores.softmax(-1)[..., :-1] @ v


@pytest.mark.parametrize(("T", "S", "padded"), [(7, 7, False), (5, 9, True), (1, 4, False), (1, 4, True)])
def test_sliding_window_attention_with_sink_logits_matches_a_dense_reference(T: int, S: int, padded: bool) -> None:
    gen = torch.Generator().manual_seed(T * 10 + S)
    q = torch.randn(2, 4, T, 16, generator=gen)
    k, v = torch.randn(2, 2, S, 16, generator=gen), torch.randn(2, 2, S, 16, generator=gen)
    sink = torch.randn(4, generator=gen)
    valid = torch.ones(2, S, dtype=torch.bool)
    if padded:
        valid[1, :2] = False
    got = sliding_window_attention(q, k, v, 3, 0.25, key_valid=valid if padded else None, block=2, sink_logits=sink)
    ref = _dense_reference(q, k, v, 3, sink, valid if padded else None)
    assert torch.allclose(got, ref, atol=1e-5)


def test_liger_memory_with_sink_logits_is_refused(registry: Any) -> None:
    with pytest.raises(surgery.PlanError, match=r"FlintAttention.*memory > 0 with learned sink logits"):
        _convert(tiny_model("flint"), registry, "liger_attention", {"window": 2, "memory": 2, "memory_chunk": 2})


def test_recurrent_mixer_applies_the_pretrained_output_gate(registry: Any) -> None:
    model = tiny_model("laguna")
    converted = _convert(model, registry, "gla")
    site = find_attention(model)[0]
    mixer, old = converted.get_submodule(site.path), model.get_submodule(site.path)
    assert torch.equal(mixer.out_gate.weight, old.g_proj.weight)
    x = torch.randn(1, 3, site.dims.hidden_size)
    o = torch.randn(1, 3, site.dims.num_heads * site.dims.head_dim)
    gate = nn.functional.softplus(old.g_proj(x)).repeat_interleave(site.dims.head_dim, -1)
    with torch.no_grad():
        assert torch.allclose(mixer.output(o, x), old.o_proj(o * gate))


def test_mixers_without_a_softmax_report_the_sink_logits_dropped(registry: Any) -> None:
    model = tiny_model("flint")
    gla, liger = _convert(model, registry, "gla"), _convert(model, registry, "liger_attention", {"window": 2})
    assert all("sink_logits" in r.dropped for r in gla.surgery.manifest)
    assert all("sink_logits" in r.copied and "sink_logits" not in r.dropped for r in liger.surgery.manifest)
    assert not any(name.endswith("sink_logits") for name, _ in gla.named_parameters())


class _SinkAttention(nn.Module):
    """Learned sinks in a module whose modeling module has no eager attention function to reproduce them."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(16, 16) for _ in range(4))
        self.sinks = nn.Parameter(torch.zeros(2))
        self.head_dim = 8


def test_sinks_without_an_eager_function_are_refused_naming_the_module() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].self_attn = _SinkAttention()
    with pytest.raises(AttentionReadError, match=r"layers\.0\.self_attn.*_SinkAttention.*eager_attention_forward"):
        find_attention(model)
