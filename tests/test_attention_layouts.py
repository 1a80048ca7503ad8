"""Reader features beyond the common layouts, each checked against the family's own module.

Grouped ``query_key_value`` rows (Falcon), q/k/v clamping (DBRX), value norms and values taken from the key
projection (Gemma-3n/4), NoPE layers (SmolLM3-style flags, EXAONE-4 global layers, read as ``surgery.sites.rotary``'s
"none" convention), layers that mask their own window (GPT-Neo), position biases (MPT, Bloom), Bloom's residual
inside attention, the ``Wo`` output projection and a ``get_decoder`` that is not the layer stack
(ModernBERT-decoder), and KV-sharing layers (refused). The coverage sweep (tests/test_coverage.py) checks whole
models; these tests pin down each piece on its own.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import Tensor, nn

from benchmarks.coverage import meta_model, tiny_model
from surgery.mixer import MixContext
from surgery.plugins.softmax import SoftmaxAttention, _with_window, eager_attention
from surgery.plugins.weight_maps import CopyQKVO
from surgery.sites.attention import AttentionReadError, find_attention, read_weights


pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax_for(model: nn.Module, index: int) -> tuple[nn.Module, SoftmaxAttention]:
    """The attention module of layer ``index`` and a ``SoftmaxAttention`` loaded from it with copy_qkvo."""
    site = find_attention(model)[index]
    module = model.get_submodule(site.path)
    mixer = SoftmaxAttention(site, SoftmaxAttention.Options(), model.config)
    result = mixer.load_state_dict(CopyQKVO()(read_weights(module, site), mixer), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    return module, mixer.eval()


def _x(model: nn.Module, T: int = 7) -> Tensor:
    return torch.randn(2, T, model.config.hidden_size, generator=torch.Generator().manual_seed(3))


# -- fused rows grouped per key/value head ---------------------------------------------------------------


def _falcon_split(module: nn.Module, x: Tensor, monkeypatch: pytest.MonkeyPatch) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[B, T, H, D]`` as a Falcon attention module splits its fused rows: its own ``_split_heads`` before
    transformers 5.25, else what its forward hands the attention function (under a RoPE of angle 0, the identity)."""
    if hasattr(module, "_split_heads"):
        return module._split_heads(module.query_key_value(x))
    seen: dict[str, Tensor] = {}

    def capture(_: nn.Module, q: Tensor, k: Tensor, v: Tensor, *args: object, **kwargs: object) -> tuple[Tensor, None]:
        seen.update(q=q.transpose(1, 2), k=k.transpose(1, 2), v=v.transpose(1, 2))
        return seen["q"], None

    monkeypatch.setattr(sys.modules[type(module).__module__], "eager_attention_forward", capture)
    monkeypatch.setattr(module.config, "_attn_implementation", "eager")
    no_angle = x.new_ones(*x.shape[:2], module.head_dim), x.new_zeros(*x.shape[:2], module.head_dim)
    module(x, attention_mask=None, position_embeddings=no_angle)
    return seen["q"], seen["k"], seen["v"]


@pytest.mark.parametrize(("multi_query", "kv_heads"), [(False, 2), (True, 1)])
def test_falcon_grouped_rows_split_like_the_module(
    multi_query: bool, kv_heads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Falcon-40B's GQA rows [q_g.. | k_g | v_g] and Falcon-7B's multi-query [q.. | k | v] read the same way."""
    from transformers import FalconForCausalLM

    from benchmarks.coverage_configs import tiny_config

    config = tiny_config("falcon")
    config.new_decoder_architecture = not multi_query  # the old architecture's default is multi-query
    model = FalconForCausalLM(config).eval()
    x = _x(model)
    for site in find_attention(model):
        module, d = model.get_submodule(site.path), site.dims
        assert (site.layout, d.num_heads, d.num_kv_heads) == ("fused_qkv_headwise", 4, kv_heads)
        weights = read_weights(module, site)
        q, k, v = _falcon_split(module, x, monkeypatch)  # the module's own split
        mine = {n: nn.functional.linear(x, weights[f"{n}_proj.weight"]).view(2, 7, -1, d.head_dim) for n in "qkv"}
        assert torch.equal(mine["q"], q.view_as(mine["q"]))
        for name, theirs in (("k", k), ("v", v)):
            # The grouped layout hands every query head its group's key/value head; multi-query keeps one.
            ours = mine[name] if theirs.numel() == mine[name].numel() else mine[name].repeat_interleave(d.groups, 2)
            assert torch.equal(ours, theirs.reshape(ours.shape)), name


def test_falcon_alibi_folded_into_the_mask_is_refused() -> None:
    from transformers import FalconForCausalLM

    from benchmarks.coverage_configs import tiny_config

    config = tiny_config("falcon")
    config.alibi = True
    with torch.device("meta"):
        model = FalconForCausalLM(config)
    with pytest.raises(AttentionReadError, match=r"transformer\.h\.0\.self_attention.*FalconAttention.*ALiBi"):
        find_attention(model)


def test_ergo_qk_scale_of_global_layers_is_refused() -> None:
    """Context-extended Ergo checkpoints scale q and k of their global layers by a buffer after RoPE."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "ErgoForCausalLM"):
        pytest.skip("Ergo is registered from transformers 5.25 on")
    from benchmarks.coverage_configs import tiny_config

    config = tiny_config("ergo")
    config.global_attention_scale = 2.0
    with torch.device("meta"):
        model = transformers.ErgoForCausalLM(config)
    with pytest.raises(AttentionReadError, match=r"model\.layers\.1\.self_attn.*ErgoAttention.*qk_scale"):
        find_attention(model)


# -- q/k/v clamp, value norms, values from keys --------------------------------------------------------------


def test_dbrx_clip_is_read_and_applied_by_mixers() -> None:
    model = tiny_model("dbrx")
    module, mixer = _softmax_for(model, 0)
    assert mixer.site.dims.qkv_clip == model.config.attn_config.clip_qkv == 0.5
    x = _x(model)
    raw = module.Wqkv(x)
    assert raw.abs().max() > 0.5  # the clamp really binds on these activations
    q, k, v = mixer.project(x)
    expected = raw.clamp(-0.5, 0.5).split([64, 32, 32], dim=-1)
    for got, want in zip((q, k, v), expected, strict=True):
        assert torch.equal(got.flatten(-2), want)


def test_gemma3n_value_norm_is_applied() -> None:
    model = tiny_model("gemma3n_text")
    module, mixer = _softmax_for(model, 0)
    assert mixer.site.v_norm is not None and mixer.v_norm is not None
    x = _x(model)
    _, _, v = mixer.project(x)
    assert torch.equal(v, module.v_norm(module.v_proj(x).view_as(v)))
    assert not torch.equal(v, module.v_proj(x).view_as(v))


def test_gemma4_values_from_the_key_projection() -> None:
    model = tiny_model("gemma4_text")
    sliding, full = find_attention(model)
    assert sliding.qkv_names == ("q_proj", "k_proj", "v_proj")
    assert full.qkv_names == ("q_proj", "k_proj") and (full.dims.num_kv_heads, full.dims.head_dim) == (1, 32)
    module = model.get_submodule(full.path)
    weights = read_weights(module, full)
    assert torch.equal(weights["v_proj.weight"], module.k_proj.weight)
    _, mixer = _softmax_for(model, 1)
    x = _x(model)
    _, _, v = mixer.project(x)
    assert torch.equal(v, module.v_norm(module.k_proj(x).view_as(v)))  # v = v_norm(k_proj(x)), before k_norm


def test_kv_sharing_layers_are_refused_by_path() -> None:
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    config = Gemma3nTextConfig(
        vocab_size=160, vocab_size_per_layer_input=160, hidden_size=64, hidden_size_per_layer_input=8,
        intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
    )  # fmt: skip
    with torch.device("meta"):
        model = Gemma3nForCausalLM(config)
    with pytest.raises(AttentionReadError, match=r"model\.layers\.2\.self_attn.*Gemma3nTextAttention.*KV sharing"):
        find_attention(model)


# -- positions: NoPE layers, own windows, position biases ---------------------------------------------------


def test_exaone4_global_layers_are_nope_without_window() -> None:
    model = meta_model("exaone4")
    sliding, full = find_attention(model)
    # NoPE is read from the forward (surgery.sites.rotary): RoPE under a condition the global layers do not meet.
    assert sliding.rotary.convention != "none" and sliding.dims.sliding_window == model.config.sliding_window
    assert (full.rotary.convention, full.dims.sliding_window) == ("none", None)
    assert model.get_submodule(full.path).sliding_window == model.config.sliding_window  # what the reader overrides


def test_use_rope_false_layer_runs_without_rotary_embeddings() -> None:
    model = tiny_model("smollm3")
    layer = model.model.layers[1].self_attn
    layer.use_rope = False  # SmolLM3's NoPE flag, as its no_rope_layers config sets it
    module, mixer = _softmax_for(model, 1)
    assert mixer.site.rotary.convention == "none"
    x = _x(model)
    positions = torch.arange(7)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(x, positions)
    mask = torch.full((7, 7), torch.finfo(x.dtype).min).triu(1)[None, None]
    want, _ = module(x, position_embeddings=(cos, sin), attention_mask=mask)
    got, _ = mixer(x, position_embeddings=(cos, sin), attention_mask=mask)
    assert torch.equal(got, want)


def test_gpt_neo_local_layer_window_and_scale() -> None:
    model = meta_model("gpt_neo")
    full, local = find_attention(model)
    assert [s.dims.scaling for s in (full, local)] == [1.0, 1.0]
    assert (full.dims.sliding_window, local.dims.sliding_window) == (None, model.config.window_size)
    assert not full.dims.window_in_mask and not local.dims.window_in_mask


def test_own_window_matches_gpt_neo_buffer() -> None:
    """``_with_window`` masks what GPT-Neo's local buffer masks, also for queries after a cached prefix."""
    model = tiny_model("gpt_neo")
    own = model.get_submodule(find_attention(model)[1].path).bias[0, 0]  # [N, N] True = visible
    like = torch.zeros(())
    for T, S in ((7, 7), (2, 9), (1, 9)):
        mask = _with_window(None, T, S, model.config.window_size, like)[0, 0]
        assert torch.equal(mask == 0, own[S - T : S, :S]), (T, S)
        padded = torch.zeros(1, 1, T, S).index_fill_(-1, torch.tensor([0]), torch.finfo(like.dtype).min)
        combined = _with_window(padded, T, S, model.config.window_size, like)
        assert torch.equal(combined[0, 0] == 0, own[S - T : S, :S] & (torch.arange(S) > 0))


def test_eager_attention_position_bias_and_boolean_mask() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=gen) for _ in range(3))
    bias = torch.randn(1, 4, 1, 5, generator=gen)
    masked = torch.ones(5, 5, dtype=torch.bool).triu(1)[None, None]  # True = masked, as MPT passes it
    module = nn.Module()
    out, weights = eager_attention(module, q, k, v, masked, scaling=0.5, position_bias=bias)
    scores = (q @ k.transpose(2, 3)) * 0.5 + bias
    want = torch.softmax(scores.masked_fill(masked, torch.finfo(q.dtype).min), dim=-1)
    assert torch.allclose(weights, want) and (weights[..., masked[0, 0]] == 0).all()
    assert torch.allclose(out, (want @ v).transpose(1, 2))
    fused, _ = eager_attention(module, q, k, v, None, scaling=0.5, position_bias=bias, bias_in_product=True)
    assert torch.allclose(fused, (torch.softmax(scores, dim=-1) @ v).transpose(1, 2), atol=1e-6)


def test_mpt_position_bias_reaches_softmax_and_not_recurrent_mixers() -> None:
    model = tiny_model("mpt")
    module, mixer = _softmax_for(model, 0)
    seen: list[MixContext] = []
    mixer.mix = lambda x, ctx: seen.append(ctx) or x  # type: ignore[method-assign]
    bias = torch.randn(4, 1, 256)
    mixer(_x(model), position_bias=bias, attention_mask=None)
    assert seen[0].position_bias is bias and not seen[0].bias_in_product
    assert "position_bias" not in seen[0].attn_kwargs  # never forwarded raw to attention functions


def test_bloom_mixer_binds_the_residual_and_alibi_like_the_module() -> None:
    model = tiny_model("bloom")
    module, mixer = _softmax_for(model, 0)
    assert mixer.site.call_args[:3] == ("residual", "alibi", "attention_mask")
    x = _x(model)
    residual = torch.randn_like(x)
    slopes = torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])
    alibi = (slopes[:, None, None] * torch.arange(7)).repeat(2, 1, 1)  # [B * H, 1, S]
    mask = torch.full((7, 7), torch.finfo(x.dtype).min).triu(1)[None, None]
    want, _ = module(x, residual, alibi=alibi, attention_mask=mask)
    got, _ = mixer(x, residual, alibi=alibi, attention_mask=mask)
    assert torch.equal(got, want)


# -- where the layers are ----------------------------------------------------------------------------------


def test_modernbert_decoder_layers_and_wo_projection() -> None:
    model = meta_model("modernbert-decoder")
    assert isinstance(model.get_decoder(), nn.Linear)  # not the layer stack: the reader searches the model
    sites = find_attention(model)
    assert [s.path for s in sites] == ["model.layers.0.attn", "model.layers.1.attn"]
    assert all(s.out_name == "Wo" for s in sites)
