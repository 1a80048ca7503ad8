"""Behaviour of particular built-in mixers inside real (tiny) models, beyond the generated conformance suite
(``tests/test_conformance.py``): beam search, hybrids with kept softmax layers, SWA against the pretrained sliding
layers, Liger's branch sum, the band attention's memory, the pooled gate."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

import surgery
from surgery.cache import MixerCacheLayer
from surgery.mixer import Mixer
from surgery.sites.attention import find_attention
from tests.models import tiny_model

ARCHS = ["llama", "qwen2", "gemma3"]
W = 5  # window of the softmax branch in these tests: sequences are longer, so keys really leave the window

pytestmark = pytest.mark.usefixtures("one_thread")


def convert(arch: str, mixer: str, options: dict[str, Any], registry: Any, layers: Any = "all", **kw: Any) -> Any:
    model = tiny_model(arch, **kw)
    rule = {"layers": layers, "mixer": mixer, "options": options}
    plan = {"version": 2, "model": "unused/hub-id", "convert": [rule]}
    return surgery.convert(surgery.load_plan(plan, registry), model)


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


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
        plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": rules}, registry)
        out = surgery.convert(plan, base)(x, attention_mask=mask).logits
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
    rule = {"layers": "all", "mixer": "liger_attention", "weights": "pooled_key_gate",
            "options": {"window": 3, "recurrent": {"mixer": "gla", "options": {"gate": "projection"}}}}
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]}, registry)
    gated = surgery.convert(plan, model)
    rec = gated.surgery.manifest[0]
    assert "recurrent.g_proj.weight" in rec.copied or "recurrent.g_proj.weight" in rec.reshaped
    with torch.no_grad():
        torch.testing.assert_close(gated(x).logits, plain(x).logits)


@pytest.mark.gpu
@pytest.mark.parametrize("recurrent", ["gla", "hgrn2"])
def test_liger_fused_kernel_equals_the_two_branch_path_on_cuda(recurrent: str, registry: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """On CUDA, training and uncached forwards run both branches in one op: loss and gradients match the
    two-branch reference, and cached decoding (the reference path) agrees with the fused full forward."""
    from surgery.plugins.liger import LigerAttention

    torch.manual_seed(0)
    model = convert("llama", "liger_attention", {"window": 5, "recurrent": recurrent}, registry).cuda()
    x = ids(2, 150).cuda()
    calls: list[int] = []
    real = LigerAttention._fused

    def spy(self: Any, *a: Any) -> Any:
        out = real(self, *a)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(LigerAttention, "_fused", spy)
    model.train()
    fused_loss = model(x, labels=x, use_cache=False).loss  # as in recovery, which turns the cache off
    fused_loss.backward()
    g_fused = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    assert calls and all(calls)
    model.zero_grad()
    monkeypatch.setattr(LigerAttention, "_fused", lambda self, *a: None)
    ref_loss = model(x, labels=x, use_cache=False).loss
    ref_loss.backward()
    torch.testing.assert_close(fused_loss, ref_loss, rtol=2e-3, atol=2e-3)
    g_ref = model.model.layers[0].self_attn.q_proj.weight.grad
    assert (g_fused - g_ref).norm() / g_ref.norm() < 1e-2
    monkeypatch.setattr(LigerAttention, "_fused", spy)
    model.eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(x, use_cache=False).logits  # uncached: the fused op
        parts = [model(x[:, :100], past_key_values=cache, use_cache=True).logits]  # cached prefill: two-branch path
        parts += [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(100, 150)]
    # fp32 inputs run the Triton kernels' dot products in TF32: agreement to about 1e-2, not to fp32 rounding.
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_liger_rotates_in_time_major_layout_as_the_layer_does(arch: str, registry: Any) -> None:
    """The fused path's RoPE on [B, T, H, D] rows gives exactly the layer's rotation (rope), transposed."""
    from surgery.mixer import MixContext
    from surgery.window import rope

    model = convert(arch, "liger_attention", {"window": W}, registry)
    mixer = model.model.layers[0].self_attn
    x = torch.randn(2, 9, model.config.hidden_size)
    q, k, _ = mixer.project(x)
    pe = model.model.rotary_emb(x, torch.arange(9)[None].expand(2, 9))
    ctx = MixContext(pe, None, None, None, {}, rotate=mixer.rotate)
    qt, kt = mixer._rope_time_major(q, k, ctx)
    qr, kr = rope(q, k, ctx)
    assert torch.equal(qt, qr.transpose(1, 2)) and torch.equal(kt, kr.transpose(1, 2))
