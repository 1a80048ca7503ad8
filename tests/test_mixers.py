"""The Liger mixers inside real (tiny) Llama, Qwen2 and Gemma3 models: exact decoding, generate(), padding, grads.

Every test converts all attention layers with the real converter and the default weight map, then checks one
property of the converted model against the same model run another way (full forward vs. cached decoding,
batched vs. per-row, cached vs. uncached beam search, or the unconverted model where the mixer must be exact).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

import surgery
from surgery.attention import find_attention
from surgery.cache import MixerCacheLayer
from surgery.mixer import Mixer
from tests.models import tiny_model

ARCHS = ["llama", "qwen2", "gemma3"]
W = 5  # window of the softmax branch in these tests: sequences are longer, so keys really leave the window

#: (id, mixer, options): every mixer, Liger Attention with each recurrence, non-default knobs where they exist.
MIXERS: list[tuple[str, str, dict[str, Any]]] = [
    ("gla", "gla", {}),
    ("hgrn2", "hgrn2", {}),
    ("hgrn2-lb", "hgrn2", {"lower_bound": 0.3}),
    ("gsa", "gsa", {"num_slots": 4}),
    ("liger-gla", "liger_attention", {"window": W}),
    ("liger-hgrn2", "liger_attention", {"window": W, "recurrent": "hgrn2"}),
    ("liger-gsa", "liger_attention", {"window": W, "recurrent": "gsa", "num_slots": 8}),
    ("swa", "swa", {"window": W}),
]
MIXER_IDS = [m[0] for m in MIXERS]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny matrices: one thread is several times faster than two, and far faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def convert(arch: str, mixer: str, options: dict[str, Any], registry: Any, layers: Any = "all", **kw: Any) -> Any:
    model = tiny_model(arch, **kw)
    rule = {"layers": layers, "mixer": mixer, "options": options}
    plan = {"version": 1, "model": "unused/hub-id", "convert": [rule]}
    return surgery.convert(surgery.load_plan(plan, registry), model, registry=registry)


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,mixer,options", MIXERS, ids=MIXER_IDS)
def test_cached_decoding_equals_full_forward(arch: str, name: str, mixer: str, options: dict, registry: Any) -> None:
    """(a) prefill of a prefix + a 4-token chunk + token-by-token decoding == one forward; (e) cache contents."""
    model = convert(arch, mixer, options, registry)
    x = ids(2, 17)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(x).logits
        parts = [model(x[:, :6], cache=cache, use_cache=True).logits]
        parts.append(model(x[:, 6:10], cache=cache, use_cache=True).logits)
        sizes = []
        for t in range(10, 17):
            parts.append(model(x[:, t : t + 1], cache=cache, use_cache=True).logits)
            sizes.append(sum(t.numel() for t in _cache_tensors(cache)))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=2e-5)
    assert cache.get_seq_length() == 17  # tokens, not heads
    assert len(set(sizes[1:])) == 1, f"cache memory grows with length: {sizes}"
    site = find_attention(tiny_model(arch))[0]
    hkv, d = site.dims.num_kv_heads, site.dims.head_dim
    for layer in cache.layers:
        assert isinstance(layer, MixerCacheLayer) and layer.seen == 17
        if mixer == "swa":
            assert layer.states is None
        elif options.get("recurrent", mixer) == "gsa":
            m = options["num_slots"]
            assert [tuple(s.shape) for s in layer.states] == [(2, hkv, d, m), (2, hkv, m, d)]
        else:
            assert [tuple(s.shape) for s in layer.states] == [(2, hkv, d, d)]  # one state per kv head
        if layer.states is not None:
            assert all(s.dtype == torch.float32 for s in layer.states)
        if mixer in ("swa", "liger_attention"):
            assert tuple(layer.keys.shape) == tuple(layer.values.shape) == (2, hkv, W, d)
        else:
            assert layer.keys is None


def _cache_tensors(cache: DynamicCache) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        out += list(layer.states or ()) + [t for t in (layer.keys, layer.values, layer.valid) if t is not None]
    return out


def _greedy_by_full_forwards(model: Any, x: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,mixer,options", MIXERS, ids=MIXER_IDS)
def test_generate_greedy_and_left_padded(arch: str, name: str, mixer: str, options: dict, registry: Any) -> None:
    """(b) greedy generate() == argmax of full forwards; (c) a left-padded batch == each row on its own."""
    model = convert(arch, mixer, options, registry)
    gen = dict(max_new_tokens=7, min_new_tokens=7, do_sample=False, pad_token_id=0)
    a, b = ids(1, 9, seed=1), ids(1, 4, seed=2)
    with torch.no_grad():
        out_a = model.generate(a, **gen, output_logits=True, return_dict_in_generate=True)
        out_b = model.generate(b, **gen, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out_a.sequences, _greedy_by_full_forwards(model, a, 7))
    # Padding tokens with real embeddings: a zero pad embedding (padding_idx) would hide unmasked padding.
    batch = torch.cat([a, torch.cat([ids(1, 5, seed=9), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, **gen, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[0], out_a.sequences[0])
    assert torch.equal(out.sequences[1, 5:], out_b.sequences[0])
    for step, (both, row_a, row_b) in enumerate(zip(out.logits, out_a.logits, out_b.logits)):
        torch.testing.assert_close(both[0], row_a[0], rtol=1e-4, atol=2e-5, msg=f"row 0, step {step}")
        torch.testing.assert_close(both[1], row_b[0], rtol=1e-4, atol=2e-5, msg=f"row 1, step {step}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,mixer,options", MIXERS, ids=MIXER_IDS)
def test_gradients_reach_projections(arch: str, name: str, mixer: str, options: dict, registry: Any) -> None:
    """(d) a training step's gradients reach q/k/v/o of every converted layer and are finite."""
    model = convert(arch, mixer, options, registry).train()
    x = ids(2, 24)
    loss = model(x, labels=x).loss
    loss.backward()
    mixers = [m for m in model.modules() if isinstance(m, Mixer)]
    assert len(mixers) == model.config.num_hidden_layers
    for m in mixers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            g = getattr(m, proj).weight.grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"layer {m.layer_idx} {proj}"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_beam_search_reorders_the_cache(arch: str, registry: Any) -> None:
    """Beam search through the cache (reorder_cache) == beam search recomputing everything (use_cache=False)."""
    model = convert(arch, "liger_attention", {"window": 3}, registry)
    x = ids(2, 6, seed=3)
    gen = dict(max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(x, **gen)
        uncached = model.generate(x, use_cache=False, **gen)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_hybrid_with_kept_softmax_layers_decodes_exactly(arch: str, registry: Any) -> None:
    """Kept softmax layers (DynamicLayer, sliding or not) and converted layers share one cache and its masks."""
    model = convert(arch, "liger_attention", {"window": 3}, registry, layers=[0, 2])
    assert not isinstance(model.model.layers[1].self_attn, Mixer)
    x = ids(2, 12, seed=4)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(x).logits
        parts = [model(x[:, :5], cache=cache, use_cache=True).logits]
        parts += [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=2e-5)
    assert isinstance(cache.layers[0], MixerCacheLayer) and not isinstance(cache.layers[1], MixerCacheLayer)
    assert cache.get_seq_length() == 12 and cache.layers[1].get_seq_length() == 12


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "gemma2"])
def test_swa_reproduces_the_pretrained_sliding_layers(arch: str, registry: Any) -> None:
    """(f) ``swa`` with the model's own window (HF counts the query itself: window - 1 previous tokens) and a
    window longer than the input on global layers gives the unconverted model's logits: RoPE, scale, GQA, q/k
    norms, biases and soft-capping are the pretrained ones, and the window has the right width."""
    base = tiny_model(arch)
    sites = find_attention(base)
    sliding = [s.layer_idx for s in sites if s.dims.sliding_window is not None]
    full = [s.layer_idx for s in sites if s.dims.sliding_window is None]
    assert sliding and full
    rules = [{"layers": sliding, "mixer": "swa", "options": {"window": sites[sliding[0]].dims.sliding_window - 1}}]
    rules.append({"layers": full, "mixer": "swa", "options": {"window": 64}})
    x = ids(2, 13, seed=5)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = base(x, attention_mask=mask).logits
        plan = surgery.load_plan({"version": 1, "model": "unused/hub-id", "convert": rules}, registry)
        out = surgery.convert(plan, base, registry=registry)(x, attention_mask=mask).logits
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(out[1, 3:], ref[1, 3:], rtol=1e-4, atol=2e-5)  # padded queries are unspecified


def test_liger_attention_is_the_weighted_sum_of_its_branches(registry: Any) -> None:
    """o_proj is linear (no bias in Llama): liger(w_swa, w_rec) == w_swa * swa + w_rec * gla, layer by layer."""
    x = torch.randn(2, 19, 64, generator=torch.Generator().manual_seed(6))
    layer = {}
    cases = (("liger_attention", {"window": 4, "w_swa": 0.3, "w_rec": 0.9}), ("swa", {"window": 4}), ("gla", {}))
    for name, opts in cases:
        model = convert("llama", name, opts, registry)
        rope = model.model.rotary_emb(x, torch.arange(19)[None])
        with torch.no_grad():
            layer[name] = model.model.layers[1].self_attn(hidden_states=x, position_embeddings=rope)[0]
    torch.testing.assert_close(layer["liger_attention"], 0.3 * layer["swa"] + 0.9 * layer["gla"], rtol=1e-4, atol=1e-5)


def test_swa_does_not_materialise_t_by_t(registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """(g) at T = 150 > window every softmax call scores at most [block, block + window] per block."""
    model = convert("llama", "liger_attention", {"window": 8}, registry)
    shapes: list[tuple[int, ...]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        shapes.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(ids(1, 150))
    assert len(shapes) == model.config.num_hidden_layers
    assert all(q <= 64 and k <= q + 8 for q, k in shapes), shapes


def test_pooled_key_gate_with_full_pool_equals_the_key_gate(registry: Any) -> None:
    """``gate: projection`` + ``pooled_key_gate`` (pool = head_dim) starts as Liger's key gate (Llama: no k norm)."""
    x = ids(2, 15, seed=7)
    plain = convert("llama", "liger_attention", {"window": 3}, registry)
    model = tiny_model("llama")
    rule = {"layers": "all", "mixer": "liger_attention", "options": {"window": 3, "gate": "projection"},
            "weights": "pooled_key_gate"}  # fmt: skip
    plan = surgery.load_plan({"version": 1, "model": "unused/hub-id", "convert": [rule]}, registry)
    gated = surgery.convert(plan, model, registry=registry)
    rec = gated.surgery.manifest[0]
    assert "g_proj.weight" in rec.copied or "g_proj.weight" in rec.reshaped
    with torch.no_grad():
        torch.testing.assert_close(gated(x).logits, plain(x).logits)
