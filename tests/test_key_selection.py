"""Learned key selection (DSA lightning indexers, ``surgery.sites.key_selection``) on latent attention.

Tiny DeepSeek-V3.2, GLM-MoE-DSA, AXK2, HY-V4 and Dots3 models (benchmarks/coverage_configs.py sizes: the indexer
keeps the top 4 keys, fewer than the sequences here, so its selection changes the logits). Kept layers run a copy of
the model's own indexer and must be bit-identical, through the cache too; recurrent mixers drop it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import surgery
from benchmarks.coverage_configs import tiny_config
from surgery.plan import PlanError
from surgery.registry import load_registry
from surgery.sites.attention import find_attention
from surgery.sites.latent import Q_GATE

DSA = ["deepseek_v32", "glm_moe_dsa", "axk2", "hy_v4", "dots3_note_text"]
INDEXER = {"indexer.wq_b.weight", "indexer.wk.weight", "indexer.k_norm.weight", "indexer.k_norm.bias",
           "indexer.weights_proj.weight"}  # fmt: skip


@pytest.fixture(scope="module")
def registry() -> Any:
    return load_registry(autoload=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(model_type: str, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A seeded tiny model in eval mode, 1-D parameters perturbed so that biases and norms matter."""
    config = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    torch.manual_seed(0)
    model = cls._from_config(config, dtype=dtype)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for param in model.parameters():
            if param.dim() == 1:
                param.add_((0.1 * torch.randn(param.shape, generator=gen)).to(param.dtype))
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError):  # HY-V4: sinks and DSA run eager only
        model.set_attn_implementation("eager")
    return model.eval()


def _convert(model: Any, registry: Any, *rules: tuple[str, str]) -> Any:
    plan = {"version": 2, "model": "unused/hub-id", "convert": [{"layers": lay, "mixer": m} for lay, m in rules]}
    return surgery.convert(surgery.load_plan(plan, registry), model)


def _ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


def _decode(model: Any, x: torch.Tensor, prefill: int) -> list[torch.Tensor]:
    """Logits of a prefill then one token at a time, through the model's own cache class."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(x[:, :prefill], cache=cache, use_cache=True).logits]
        steps += [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(prefill, x.shape[1])]
    return steps


def test_sites_read_the_indexer_and_the_family_variants() -> None:
    sites = {t: find_attention(_model(t))[0] for t in DSA}
    for t, site in sites.items():
        assert site.key_selection is not None and site.key_selection.name == "indexer", t
    # Layers that take and return prev_topk_indices pass their selection on.
    assert {t for t, s in sites.items() if s.key_selection.passes_on} == {"glm_moe_dsa", "hy_v4"}
    assert sites["axk2"].latent.q_names == Q_GATE and sites["axk2"].latent.q_gate
    dots = sites["dots3_note_text"].latent
    assert dots.k_rope_norm == "k_rope_only_layernorm" and dots.q_latent_scale != 1.0 and dots.latent_scale != 1.0
    hy = sites["hy_v4"].extras
    assert hy.sink_logits and hy.gate is not None and not hy.gate.per_head
    assert sites["dots3_note_text"].extras.gate.per_head  # g_proj: one gate per head
    # Dots3's second layer is a sliding one without an indexer.
    assert find_attention(_model("dots3_note_text"))[1].key_selection is None


def test_the_selection_matters_in_these_models() -> None:
    """Guard for the tests below: with every key selected the logits change, so a kept layer must select."""
    model = _model("deepseek_v32")
    x = _ids(2, 12)
    with torch.no_grad():
        sparse = model(x).logits
        for layer in model.model.layers:
            layer.self_attn.indexer.index_topk = 1000
        dense = model(x).logits
    assert (sparse - dense).abs().max() > 1e-2


@pytest.mark.parametrize("model_type", DSA)
def test_softmax_identity_is_bit_exact_with_padding_and_decoding(model_type: str, registry: Any) -> None:
    model = _model(model_type)
    x = _ids(2, 12)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        ref, ref_padded = model(x).logits, model(x, attention_mask=mask).logits
    ref_steps = _decode(model, x, 7)
    converted = _convert(model, registry, ("all", "softmax"))
    with torch.no_grad():
        assert torch.equal(converted(x).logits, ref)
        assert torch.equal(converted(x, attention_mask=mask).logits, ref_padded)
    for got, want in zip(_decode(converted, x, 7), ref_steps, strict=True):
        assert torch.equal(got, want)


def test_pretrained_decoding_differs_from_its_full_forward_where_index_scores_tie() -> None:
    """Why the tests compare decoding with the pretrained model's decoding, not with the full forward.

    ReLU makes many index scores exactly 0, and ``topk`` breaks those ties by position differently for a row of
    12 keys (the full forward, the last one masked) than for one of 11 (a decode step): the pretrained model itself
    then selects other keys at decode. Kept layers reproduce its decoding bit for bit instead.
    """
    model = _model("deepseek_v32")
    x = _ids(2, 12)
    with torch.no_grad():
        full = model(x).logits
    assert (torch.cat(_decode(model, x, 5), 1) - full).abs().max() > 1e-2


@pytest.mark.parametrize("model_type", ["deepseek_v32", "hy_v4"])
def test_kept_layer_decodes_as_the_pretrained_one_next_to_a_recurrent_layer(model_type: str, registry: Any) -> None:
    """Layer 0 kept (softmax), layer 1 recurrent: the same as leaving layer 0 unconverted, forward and decoding.

    The kept layer's indexer appends its keys to its own cache slot, next to the recurrent layer's state.
    """
    reference = _convert(_model(model_type), registry, ([1], "gla"))
    converted = _convert(_model(model_type), registry, ([0], "softmax"), ([1], "gla"))
    x = _ids(2, 12)
    with torch.no_grad():
        assert torch.equal(converted(x).logits, reference(x).logits)
    cache = DynamicCache(config=converted.config)
    with torch.no_grad():
        steps = [converted(x[:, :5], cache=cache, use_cache=True).logits]
        steps += [converted(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(5, 12)]
    for got, want in zip(steps, _decode(reference, x, 5), strict=True):
        assert torch.equal(got, want)
    assert cache.layers[0].indexer_keys.shape[:2] == (2, 12)  # one indexer key per token seen


@pytest.mark.parametrize("mixer", ["gla", "liger_attention"])
def test_recurrent_mixers_drop_the_indexer_and_the_manifest_says_so(mixer: str, registry: Any) -> None:
    model = _model("deepseek_v32")
    kept = _convert(_model("deepseek_v32"), registry, ("all", "softmax"))
    converted = _convert(model, registry, ("all", mixer))
    for record in converted.surgery.manifest:
        assert set(record.dropped) == INDEXER
        assert not INDEXER & {*record.copied, *record.created}
    assert not hasattr(converted.model.layers[0].self_attn, "indexer")
    # A kept layer owns a copy under the model's own names, so saved tensors and LoRA targets keep them.
    record = kept.surgery.manifest[0]
    assert INDEXER <= set(record.copied) and not record.dropped
    assert "model.layers.0.self_attn.indexer.wq_b.weight" in kept.state_dict()


def test_a_shared_layer_reuses_the_selection_of_the_layer_before(registry: Any) -> None:
    """GLM-MoE-DSA "shared" layers run no indexer: kept, they take the previous layer's selection."""
    model = _model("glm_moe_dsa", indexer_types=["full", "shared"])
    sites = find_attention(model)
    assert sites[1].key_selection.shared and model.model.layers[1].self_attn.indexer is None
    x = _ids(2, 12)
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(_convert(model, registry, ("all", "softmax"))(x).logits, ref)
    # The first layer's mixer would drop the selection the second one needs: refused at conversion.
    with pytest.raises(PlanError, match=r"layer 1 .*GlmMoeDsaAttention.* reuses the key selection of layer 0"):
        _convert(_model("glm_moe_dsa", indexer_types=["full", "shared"]), registry, ([0], "gla"), ([1], "softmax"))
    # Converting the shared layer instead is fine.
    _convert(_model("glm_moe_dsa", indexer_types=["full", "shared"]), registry, ([1], "gla"))


def test_bf16_model_keeps_its_fp32_indexer_and_sinks(registry: Any) -> None:
    """HY-V4 keeps its sinks, indexer norm and weights projection in fp32 in a bf16 model: so must a kept layer."""
    model = _model("hy_v4", dtype=torch.bfloat16)
    x = _ids(2, 12)
    with torch.no_grad():
        ref = model(x).logits
        converted = _convert(model, registry, ("all", "softmax"))
        assert torch.equal(converted(x).logits, ref)
    mixer = converted.model.layers[0].self_attn
    assert mixer.sink_logits.dtype == torch.float32 and mixer.indexer.weights_proj.weight.dtype == torch.float32
    assert mixer.q_a_proj.weight.dtype == torch.bfloat16
