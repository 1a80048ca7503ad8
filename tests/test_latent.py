"""Multi-head latent attention (``surgery.sites.latent``) and value head dims that differ from the query/key head dim.

Two tiny models of tests/models.py: DeepSeek-V3 (MLA: low-rank q and kv with norms in between, interleaved RoPE on
a trailing part, q/k head dim 24, value head dim 12) and MiMo-V2 (separate projections, value head dim 24 != q/k
head dim 16, scaled values). Kept layers must stay bit-identical and every mixer must take the unequal dims.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache
from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
)

import surgery
from surgery.plan import PlanError
from surgery.recovery.adapters import mixer_params
from surgery.registry import load_registry
from surgery.sites.attention import AttentionReadError, find_attention, read_weights
from surgery.sites.latent import KV, Q_FULL, Q_LORA, LatentQKV
from surgery.sites.rotary import Rotary
from tests.models import meta_model, tiny_model


@pytest.fixture(scope="module")
def registry() -> Any:
    return load_registry(autoload=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _convert(model: Any, mixer: str, registry: Any, options: dict | None = None) -> Any:
    rule = {"layers": "all", "mixer": mixer, "options": options or {}}
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]}, registry)
    return surgery.convert(plan, model)


def _ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


def test_latent_site_dims_are_read_from_the_projection_widths() -> None:
    site = find_attention(meta_model("deepseek_v3"))[0]
    d = site.dims
    assert site.layout == "latent" and site.qkv_names == (*Q_LORA, *KV) and site.out_name == "o_proj"
    assert (d.num_heads, d.num_kv_heads, d.head_dim, d.v_head_dim, d.hidden_size) == (4, 4, 24, 12, 64)
    assert site.latent == LatentQKV(Q_LORA, KV, rank=16, nope_dim=16, rope_dim=8)
    # RoPE on the trailing 8 dims goes through the site's Rotary, as on every other site.
    assert site.rotary == Rotary("latent", trailing=8, interleaved=True)
    assert d.scaling == pytest.approx(24**-0.5)
    assert set(site.modules) == {*Q_LORA, *KV}


def test_latent_site_without_query_rank_and_with_rotate_half() -> None:
    site = find_attention(meta_model("deepseek_v3", q_lora_rank=None, rope_interleave=False))[0]
    assert site.latent is not None and site.latent.q_names == Q_FULL and not site.rotary.interleaved


def test_latent_weights_keep_the_models_names_and_are_copied(registry: Any) -> None:
    model = tiny_model("deepseek_v3")
    attn = model.model.layers[0].self_attn
    src = read_weights(attn, find_attention(model)[0])
    assert set(src) == {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
                        "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"}  # fmt: skip
    assert src["kv_b_proj.weight"].data_ptr() == attn.kv_b_proj.weight.data_ptr()
    converted = _convert(model, "gla", registry)
    record = converted.surgery.manifest[0]
    assert sorted(record.copied) == sorted(src) and not record.created and not record.dropped
    mixer = converted.model.layers[0].self_attn
    assert torch.equal(mixer.kv_b_proj.weight, src["kv_b_proj.weight"])
    assert mixer.kv_b_proj.weight.data_ptr() != src["kv_b_proj.weight"].data_ptr()  # a copy, not the original
    # The copied sub-graph is pretrained: recovery adapts or freezes it, never trains it as a new parameter.
    assert mixer_params(converted) == {}


@pytest.mark.parametrize(
    "overrides",
    [{}, {"rope_interleave": False}, {"q_lora_rank": None}],
    ids=["interleaved", "rotate_half", "no_query_rank"],
)
def test_softmax_identity_on_latent_attention_is_bit_exact(overrides: dict, registry: Any) -> None:
    """Full forward, left padding, and prefill + decode through the cache: bit-identical to the pretrained model."""
    model = tiny_model("deepseek_v3", **overrides)
    x = _ids(2, 11)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        ref, ref_padded = model(x).logits, model(x, attention_mask=mask).logits
        ref_cache = DynamicCache(config=model.config)
        ref_steps = [model(x[:, :7], cache=ref_cache, use_cache=True).logits]
        ref_steps += [model(x[:, t : t + 1], cache=ref_cache, use_cache=True).logits for t in range(7, 11)]
        converted = _convert(model, "softmax", registry)
        assert torch.equal(converted(x).logits, ref)
        assert torch.equal(converted(x, attention_mask=mask).logits, ref_padded)
        cache = DynamicCache(config=converted.config)
        steps = [converted(x[:, :7], cache=cache, use_cache=True).logits]
        steps += [converted(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(7, 11)]
    for got, want in zip(steps, ref_steps):
        assert torch.equal(got, want)


def test_latent_rotary_matches_transformers_conventions() -> None:
    """Only the trailing rope dims turn, exactly as each family's helper turns them (``Rotary`` ``latent``)."""
    gen = torch.Generator().manual_seed(0)
    B, H, T, nope, rope = 2, 3, 5, 4, 8
    q, k = torch.randn(B, H, T, nope + rope, generator=gen), torch.randn(B, H, T, nope + rope, generator=gen)
    freqs = torch.randn(B, T, rope // 2, generator=gen)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    for interleaved, fn in ((True, apply_rotary_pos_emb_interleave), (False, apply_rotary_pos_emb)):
        rotary = Rotary("latent", trailing=rope, interleaved=interleaved)
        got_q, got_k = rotary.apply(q.transpose(1, 2), k.transpose(1, 2), (cos, sin))
        want_q, want_k = fn(q[..., nope:], k[..., nope:], cos, sin)
        assert torch.equal(got_q, torch.cat([q[..., :nope], want_q], -1))
        assert torch.equal(got_k, torch.cat([k[..., :nope], want_k], -1))
    # DeepSeek-V2 passes complex freqs_cis instead of (cos, sin): recognised from the tensor itself.
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
    got_q, got_k = Rotary("latent", trailing=rope).apply(q.transpose(1, 2), k.transpose(1, 2), freqs_cis)
    want_q, want_k = apply_rotary_emb(q[..., nope:], k[..., nope:], freqs_cis)
    assert torch.equal(got_q, torch.cat([q[..., :nope], want_q], -1))
    assert torch.equal(got_k, torch.cat([k[..., :nope], want_k], -1))


#: Every built-in mixer on a site whose value head dim differs: mom on MiMo only (latent sites have no k/v_proj).
_MIXERS = [("gla", {}), ("hgrn2", {}), ("gsa", {"num_slots": 4}), ("swa", {"window": 3}),
           ("liger_attention", {"window": 3}), ("liger_attention", {"window": 2, "memory": 2, "memory_chunk": 2}),
           ("liger_attention", {"window": 3, "recurrent": {"mixer": "gsa", "options": {"num_slots": 4}}, "sinks": 2})]  # fmt: skip
_CASES = [pytest.param(arch, m, o, id=f"{arch}-{m}-{i}") for arch in ("deepseek_v3", "mimo_v2_flash")
          for i, (m, o) in enumerate(_MIXERS)] + [pytest.param("mimo_v2_flash", "mom", {}, id="mimo_v2_flash-mom")]


@pytest.mark.parametrize("arch,mixer,options", _CASES)
def test_every_mixer_takes_a_value_head_dim_of_its_own(arch: str, mixer: str, options: dict, registry: Any) -> None:
    """Prefill, then one token at a time through the cache == one forward, with v_head_dim != head_dim."""
    converted = _convert(tiny_model(arch), mixer, registry, options)
    layer = converted.model.layers[0].self_attn
    assert layer.v_head_dim != layer.head_dim and layer.o_proj.in_features == layer.num_heads * layer.v_head_dim
    x = _ids(2, 12)
    cache = DynamicCache(config=converted.config)
    with torch.no_grad():
        full = converted(x).logits
        parts = [converted(x[:, :5], cache=cache, use_cache=True).logits]
        parts += [converted(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=2e-5)


def test_softmax_identity_with_unequal_value_head_dim_and_value_scale(registry: Any) -> None:
    model = tiny_model("mimo_v2_flash")
    site = find_attention(model)[0]
    assert (site.dims.head_dim, site.dims.v_head_dim, site.dims.value_scale) == (16, 24, 0.7)
    x = _ids(2, 9)
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(_convert(model, "softmax", registry)(x).logits, ref)


def test_mom_refuses_latent_attention_at_check(registry: Any) -> None:
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [{"layers": "all", "mixer": "mom"}]},
                             registry)  # fmt: skip
    with pytest.raises(PlanError, match="DeepseekV3Attention.*mom.*latent"):
        surgery.check(plan, meta_model("deepseek_v3"))


def test_latent_attention_with_unread_parts_names_path_and_class() -> None:
    model = meta_model("deepseek_v3")
    attn = model.model.layers[1].self_attn
    attn.indexer = torch.nn.Linear(4, 4)  # DeepSeek-V3.2's sparse-attention indexer stands for any extra part
    with pytest.raises(AttentionReadError, match=r"model\.layers\.1\.self_attn.*DeepseekV3Attention.*indexer"):
        find_attention(model)
    del attn.indexer
    attn.kv_a_proj_with_mqa = torch.nn.Linear(64, 16 + 9)  # a rope part that no head count fits
    with pytest.raises(AttentionReadError, match=r"DeepseekV3Attention.*do not fit"):
        find_attention(model)


def test_layer_with_two_attention_sublayers_gives_two_sites(registry: Any) -> None:
    """LongCat-Flash: two attention modules per decoder layer, each with its own cache slot."""
    from transformers import LongcatFlashForCausalLM

    from benchmarks.coverage_configs import tiny_config

    config = tiny_config("longcat_flash")
    config.num_layers = 2  # two decoder layers, four attention modules
    with torch.device("meta"):
        sites = find_attention(LongcatFlashForCausalLM(config))
    assert [s.layer_idx for s in sites] == [0, 1, 2, 3]
    assert [s.path for s in sites[:2]] == ["model.layers.0.self_attn.0", "model.layers.0.self_attn.1"]
    assert sites[0].latent is not None and sites[0].latent.q_scale != 1.0 and sites[0].latent.latent_scale != 1.0
