"""Reading attention modules (``surgery.sites.attention``) and the identity mixer that proves the reading exact.

The identity tests swap every attention module of a tiny model for ``SoftmaxAttention`` loaded through
``read_weights`` + ``copy_qkvo`` and require bit-identical logits, with and without left padding, and through
the generation cache.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy
import pytest
import torch
from torch import Tensor, nn
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_rope
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

from surgery import hookspecs
from surgery.mixer import apply_rope
from surgery.plugins import softmax, weight_maps
from surgery.plugins.softmax import SoftmaxAttention
from surgery.plugins.weight_maps import CopyQKVO
from surgery.sites.attention import CANONICAL, AttentionReadError, AttentionSite, find_attention, read_weights
from tests.models import ARCHS, WINDOW, meta_model, tiny_config, tiny_model

#: What each tiny architecture is built to exercise (see tests/models.py): layout, q/k norms, qkv and o biases.
FEATURES = {
    "llama": ("separate", False, False, False),
    "mistral": ("separate", False, False, False),
    "qwen2": ("separate", False, True, False),
    "qwen3": ("separate", True, False, False),
    "gemma3": ("separate", True, False, False),
    "phi3": ("fused_qkv", False, False, False),
    "gpt_neox": ("fused_qkv_headwise", False, True, True),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _expected_window(arch: str, layer: int) -> int | None:
    config = tiny_config(arch)
    if arch == "mistral":
        return WINDOW  # one window for all layers
    types = getattr(config, "layer_types", None)
    return WINDOW if types is not None and types[layer] == "sliding_attention" else None


# -- find_attention ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_find_attention_reads_every_layer(arch: str) -> None:
    model = tiny_model(arch)
    config = model.config
    sites = find_attention(model)
    layout, norms, qkv_bias, o_bias = FEATURES[arch]
    assert [s.layer_idx for s in sites] == list(range(config.num_hidden_layers))
    for site in sites:
        module = model.get_submodule(site.path)
        assert site.path.rsplit(".", 2)[-2] == str(site.layer_idx)
        assert site.module_class == type(module).__name__ and "Attention" in site.module_class
        d = site.dims
        assert site.layout == layout
        assert d.hidden_size == config.hidden_size
        assert d.num_heads == config.num_attention_heads
        assert d.num_kv_heads == getattr(config, "num_key_value_heads", config.num_attention_heads)
        assert d.groups * d.num_kv_heads == d.num_heads
        assert d.head_dim == (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        assert d.scaling == module.scaling
        assert (d.qkv_bias, d.o_bias) == (qkv_bias, o_bias)
        assert d.sliding_window == _expected_window(arch, site.layer_idx)
        assert d.softcap is None
        assert (site.q_norm is not None, site.k_norm is not None) == (norms, norms)
        if norms:
            assert site.q_norm is module.q_norm and site.k_norm is module.k_norm


def test_find_attention_reads_dims_that_differ_from_the_defaults() -> None:
    qwen3 = find_attention(tiny_model("qwen3"))[0].dims
    assert qwen3.head_dim == 24 != 64 // 4 and qwen3.scaling == 24**-0.5
    gemma = find_attention(tiny_model("gemma3"))[0].dims
    assert gemma.scaling == 20**-0.5 != gemma.head_dim**-0.5  # query_pre_attn_scalar
    capped = find_attention(tiny_model("gemma2"))
    assert [s.dims.softcap for s in capped] == [2.0] * 3
    assert [s.dims.sliding_window for s in capped] == [WINDOW, None, WINDOW]


@pytest.mark.parametrize("arch", ARCHS)
def test_find_attention_on_meta_device_matches_real(arch: str) -> None:
    meta = meta_model(arch)
    real = find_attention(tiny_model(arch))
    on_meta = find_attention(meta)
    assert on_meta == real  # dataclass equality: path, class, dims, layout
    assert all(t.is_meta for s in on_meta for t in read_weights(meta.get_submodule(s.path), s).values())


# -- read_weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_read_weights_shapes_and_keys(arch: str) -> None:
    model = tiny_model(arch)
    for site in find_attention(model):
        d = site.dims
        weights = read_weights(model.get_submodule(site.path), site)
        assert set(weights) <= set(CANONICAL)
        q, kv, C = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.hidden_size
        expected = {"q_proj.weight": (q, C), "k_proj.weight": (kv, C), "v_proj.weight": (kv, C)}
        expected["o_proj.weight"] = (C, q)
        if d.qkv_bias:
            expected |= {"q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,)}
        if d.o_bias:
            expected["o_proj.bias"] = (C,)
        if site.q_norm is not None:
            expected |= {"q_norm.weight": (d.head_dim,), "k_norm.weight": (d.head_dim,)}
        assert {k: tuple(v.shape) for k, v in weights.items()} == expected


def test_read_weights_separate_layout_returns_the_parameters_themselves() -> None:
    model = tiny_model("qwen3")
    site = find_attention(model)[1]
    module = model.get_submodule(site.path)
    weights = read_weights(module, site)
    for key, tensor in weights.items():
        assert tensor.data_ptr() == module.get_parameter(key).data_ptr()


def _split_projection(x: Tensor, weights: dict[str, Tensor], name: str) -> Tensor:
    return nn.functional.linear(x, weights[f"{name}_proj.weight"], weights.get(f"{name}_proj.bias"))


def test_phi3_split_gives_identical_projections() -> None:
    model = tiny_model("phi3")
    x = torch.randn(2, 7, model.config.hidden_size)
    for site in find_attention(model):
        module, d = model.get_submodule(site.path), site.dims
        weights = read_weights(module, site)
        fused = module.qkv_proj(x)
        q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        assert torch.equal(_split_projection(x, weights, "q"), fused[..., :q])
        assert torch.equal(_split_projection(x, weights, "k"), fused[..., q : q + kv])
        assert torch.equal(_split_projection(x, weights, "v"), fused[..., q + kv :])


def test_gpt_neox_headwise_split_gives_identical_projections() -> None:
    model = tiny_model("gpt_neox")
    x = torch.randn(2, 7, model.config.hidden_size)
    for site in find_attention(model):
        module, d = model.get_submodule(site.path), site.dims
        weights = read_weights(module, site)
        # The module's own split: per head [q_h | k_h | v_h], then chunk.
        per_head = module.query_key_value(x).view(2, 7, d.num_heads, 3 * d.head_dim)
        for name, expected in zip("qkv", per_head.chunk(3, dim=-1)):
            got = _split_projection(x, weights, name).view(2, 7, d.num_heads, d.head_dim)
            assert torch.equal(got, expected), name
        assert not torch.equal(weights["q_proj.weight"], module.query_key_value.weight[: d.num_heads * d.head_dim])


# -- errors --------------------------------------------------------------------------------------------


class ConvAttention(nn.Module):
    """PyTorch MultiheadAttention-like naming (in_proj / proj): looks like attention, has no readable layout."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)


class LambdaAttention(nn.Module):
    """Separate q/k/v/o plus a learned vector (differential attention's lambda) that a reader would drop."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.head_dim = hidden // heads
        self.q_proj, self.k_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.v_proj, self.o_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.lambda_q1 = nn.Parameter(torch.zeros(self.head_dim))


def test_unreadable_attention_names_path_and_class() -> None:
    model = tiny_model("llama")
    model.model.layers[1].self_attn = ConvAttention(model.config.hidden_size)
    with pytest.raises(AttentionReadError, match=r"model\.layers\.1\.self_attn.*ConvAttention"):
        find_attention(model)


def test_attention_with_unread_parameters_is_refused() -> None:
    model = tiny_model("llama")
    model.model.layers[2].self_attn = LambdaAttention(model.config.hidden_size, model.config.num_attention_heads)
    with pytest.raises(AttentionReadError, match=r"model\.layers\.2\.self_attn.*LambdaAttention.*lambda_q1"):
        find_attention(model)


def test_whole_projection_norm_is_read_and_applied_over_all_heads() -> None:
    model = tiny_model("qwen3")
    attn = model.model.layers[0].self_attn
    attn.q_norm = nn.RMSNorm(attn.q_proj.out_features)  # OLMo-2 style: one norm over all heads
    site = find_attention(model)[0]
    x = torch.randn(2, 3, site.dims.num_heads, site.dims.head_dim)
    assert torch.equal(site.q_norm(x), attn.q_norm(x.flatten(-2)).view_as(x))
    assert read_weights(attn, site)["q_norm.weight"].shape == (site.dims.num_heads * site.dims.head_dim,)


def test_norm_of_another_width_is_refused() -> None:
    model = tiny_model("qwen3")
    attn = model.model.layers[0].self_attn
    attn.q_norm = nn.RMSNorm(7)
    with pytest.raises(AttentionReadError, match=r"model\.layers\.0\.self_attn.*Qwen3Attention.*q_norm"):
        find_attention(model)


def test_use_rope_false_on_a_layer_whose_forward_always_rotates_is_refused() -> None:
    model = tiny_model("llama")
    model.model.layers[0].self_attn.use_rope = False  # Llama-4 / SmolLM3 flag; Llama's forward ignores it
    with pytest.raises(AttentionReadError, match="LlamaAttention.*use_rope is false"):
        find_attention(model)


def test_model_without_decoder_layers_names_the_model_class() -> None:
    class NoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    with pytest.raises(AttentionReadError, match="NoLayers"):
        find_attention(NoLayers())


# -- identity: SoftmaxAttention reproduces the pretrained model bit for bit ---------------------------------


def _swap_in_softmax(model: nn.Module) -> list[AttentionSite]:
    """Replace every attention module by ``SoftmaxAttention`` loaded with copy_qkvo (the converter's job later)."""
    sites = find_attention(model)
    for site in sites:
        old = model.get_submodule(site.path)
        mixer = SoftmaxAttention(site, SoftmaxAttention.Options(), model.config)
        state = CopyQKVO()(read_weights(old, site), mixer)
        result = mixer.load_state_dict(state, strict=False)
        assert result.unexpected_keys == [] and result.missing_keys == []
        parent, _, name = site.path.rpartition(".")
        setattr(model.get_submodule(parent), name, mixer)
    return sites


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_softmax_mixer_is_bit_identical(arch: str, implementation: str) -> None:
    _assert_identity(arch, implementation)


def test_softmax_mixer_keeps_attention_softcapping() -> None:
    _assert_identity("gemma2", "eager")


def _assert_identity(arch: str, implementation: str) -> None:
    """Logits of the swapped model equal the original's exactly: full batch, left-padded batch, every decode step."""
    base = tiny_model(arch, attn_implementation=implementation)
    converted = tiny_model(arch, attn_implementation=implementation)
    sites = _swap_in_softmax(converted)
    assert all(isinstance(converted.get_submodule(s.path), SoftmaxAttention) for s in sites)

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, base.config.vocab_size, (2, 3 * WINDOW), generator=gen)
    left_padded = torch.ones_like(ids)
    left_padded[0, :3] = 0
    with torch.no_grad():
        for mask in (None, left_padded):
            expected = base(ids, attention_mask=mask).logits
            assert torch.equal(converted(ids, attention_mask=mask).logits, expected), f"mask={mask is not None}"
        kwargs = dict(attention_mask=left_padded, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                      output_logits=True)  # fmt: skip
        want, got = base.generate(ids, **kwargs), converted.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits, strict=True)):
        assert torch.equal(a, b), f"decode step {step}"


@pytest.mark.parametrize(
    ("rope", "rotary"), [(llama_rope, 16), (phi3_rope, 16), (phi3_rope, 8), (neox_rope, 16), (neox_rope, 4)]
)
def test_apply_rope_matches_transformers(rope: Callable[..., tuple[Tensor, Tensor]], rotary: int) -> None:
    """Full and partial rotary (the first ``rotary`` dims of each 16-dim head) as transformers computes them."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 16, generator=gen), torch.randn(2, 2, 5, 16, generator=gen)
    angles = torch.randn(2, 5, rotary // 2, generator=gen).repeat(1, 1, 2)
    cos, sin = angles.cos(), angles.sin()
    want_q, want_k = rope(q, k, cos, sin)
    assert torch.equal(apply_rope(q, cos, sin), want_q) and torch.equal(apply_rope(k, cos, sin), want_k)


# -- copy_qkvo and registration -----------------------------------------------------------------------


def test_copy_qkvo_returns_what_the_mixer_has_and_checks_shapes() -> None:
    model = tiny_model("qwen2")
    site = find_attention(model)[0]
    weights = read_weights(model.get_submodule(site.path), site)
    mixer = SoftmaxAttention(site, SoftmaxAttention.Options(), model.config)
    copied = CopyQKVO()(weights | {"unrelated.weight": torch.zeros(1)}, mixer)
    assert set(copied) == set(dict(mixer.named_parameters())) == set(weights)
    weights["k_proj.weight"] = weights["k_proj.weight"][:-1]
    with pytest.raises(ValueError, match="k_proj.weight"):
        CopyQKVO()(weights, mixer)


def test_plugins_register_through_pluggy() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(softmax)
    pm.register(weight_maps)
    assert [c for group in pm.hook.surgery_mixers() for c in group] == [SoftmaxAttention]
    assert [c for group in pm.hook.surgery_weight_maps() for c in group] == [CopyQKVO]
    assert SoftmaxAttention.name == "softmax" and SoftmaxAttention.default_weights == CopyQKVO.name == "copy_qkvo"
    assert CopyQKVO.needs == {} and SoftmaxAttention.Options.model_fields == {}
