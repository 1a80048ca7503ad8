"""How attention layers apply RoPE (``surgery.sites.rotary``), read from their ``forward``, and the sharded qkv split.

The synthetic attention classes below exist only for their ``forward`` source: ``read_rotary`` parses it and never
runs it. Real families (Cohere-2, HunYuan, GPT-J, Llama-4, CodeGen) check the reading end to end.
"""

from __future__ import annotations

import ast
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from benchmarks.coverage import meta_model, tiny_model
from surgery.mixer import MixContext, apply_rope
from surgery.plugins.softmax import SoftmaxAttention
from surgery.sites.attention import AttentionReadError, find_attention, read_weights
from surgery.sites.rotary import ROTATE_HALF, Rotary, _evaluate, read_rotary
from surgery.window import rope


pytestmark = pytest.mark.usefixtures("one_thread")


def apply_rotary_pos_emb(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
) -> tuple[Tensor, Tensor]:
    """Llama's arithmetic: the reader must recognise it as rotate-half and keep the fast path."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def apply_interleaved_rope(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
) -> tuple[Tensor, Tensor]:
    """Rotation of adjacent pairs (x0, x1), (x2, x3), ... with the first half of cos/sin repeated per pair."""
    cos = cos.unsqueeze(unsqueeze_dim)[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
    sin = sin.unsqueeze(unsqueeze_dim)[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)

    def turn(x: Tensor) -> Tensor:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)

    return q * cos + turn(q) * sin, k * cos + turn(k) * sin


def rotary_one(tensor: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """GPT-J style: one tensor ``[B, T, H, R]``, half-width sin/cos given in that order."""
    sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
    cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
    turned = torch.stack((-tensor[..., 1::2], tensor[..., 0::2]), dim=-1).flatten(-2)
    return tensor * cos + turned * sin


class _Base(nn.Module):
    def __init__(self, **attrs: Any) -> None:
        super().__init__()
        self.q_norm, self.k_norm = nn.RMSNorm(8), nn.RMSNorm(8)
        for name, value in attrs.items():
            setattr(self, name, value)


class StandardAttention(_Base):
    def forward(self, q: Tensor, k: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Any:
        q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        return apply_rotary_pos_emb(q, k, cos, sin)


class InterleavedNormAfterAttention(_Base):
    def forward(self, q: Tensor, k: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Any:
        cos, sin = position_embeddings
        q, k = apply_interleaved_rope(q, k, cos, sin)
        return self.q_norm(q), self.k_norm(k)


class ConditionalAttention(_Base):
    def forward(self, q: Tensor, k: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Any:
        cos, sin = position_embeddings
        if self.sliding_window is not None or self.force_rope:
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k


class SingleTensorAttention(_Base):
    def forward(self, q: Tensor, k: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Any:
        sin, cos = position_embeddings
        return rotary_one(q[..., : self.rotary_dim], sin, cos), rotary_one(k[..., : self.rotary_dim], sin, cos)


def _read(module: nn.Module) -> Rotary:
    return read_rotary("layers.0.attn", module, 8, ("q_norm", "k_norm"))


def _embeddings(B: int = 2, T: int = 5, R: int = 8) -> tuple[Tensor, Tensor]:
    angles = torch.randn(B, T, R)
    return angles.cos(), angles.sin()


def test_rotate_half_function_keeps_the_fast_path() -> None:
    assert _read(StandardAttention()) == ROTATE_HALF


def test_interleaved_function_is_called_and_norms_after_rope_are_read() -> None:
    rotary = _read(InterleavedNormAfterAttention())
    assert rotary.convention == "model" and rotary.function is apply_interleaved_rope
    assert rotary.norms_after and rotary.tensors == ("q", "k") and rotary.embeddings == (("cos", 0), ("sin", 1))
    q, k = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 1, 8)  # [B, T, H, D] as Mixer.project gives them
    pe = _embeddings()
    got_q, got_k = rotary.apply(q, k, pe)
    want_q, want_k = apply_interleaved_rope(q.transpose(1, 2), k.transpose(1, 2), *pe)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert not torch.equal(got_q, apply_rope(q.transpose(1, 2), *pe))  # really another convention


@pytest.mark.parametrize(("window", "force", "convention"), [(4, False, "rotate_half"), (None, True, "rotate_half"),
                                                               (None, False, "none")])  # fmt: skip
def test_rope_under_a_condition_on_the_module_is_evaluated(window: int | None, force: bool, convention: str) -> None:
    rotary = _read(ConditionalAttention(sliding_window=window, force_rope=force))
    assert rotary.convention == convention
    q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    if convention == "none":  # NoPE: the layer sees its embeddings but does not rotate
        assert torch.equal(rotary.apply(q, k, _embeddings(1))[0], q.transpose(1, 2))


def test_condition_evaluation_is_three_valued_and_runs_no_code() -> None:
    module = _Base(flag=True, window=None)

    def value(source: str) -> Any:
        return _evaluate(ast.parse(source, mode="eval").body, module)

    assert value("self.window is None and self.flag") is True
    assert value("not self.flag or position_embeddings is None") is not True  # depends on the call: unknown
    assert value("self.window is not None and position_embeddings is None") is False  # decided by `and`
    assert value("self.flag or len(x) > 0") is True
    assert value("self.method()") is not True and value("self.method()") is not False


def test_single_tensor_function_with_sin_cos_order_and_rotary_dim() -> None:
    rotary = _read(SingleTensorAttention(rotary_dim=4))
    assert (rotary.convention, rotary.layout, rotary.tensors, rotary.rotary_dim) == ("model", "time", ("tensor",), 4)
    assert rotary.embeddings == (("sin", 0), ("cos", 1))
    q, k = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8)
    angles = torch.randn(2, 5, 2)
    got_q, _ = rotary.apply(q, k, (angles.sin(), angles.cos()))  # the layer's own order: (sin, cos)
    want = torch.cat([rotary_one(q[..., :4], angles.sin(), angles.cos()), q[..., 4:]], dim=-1).transpose(1, 2)
    assert torch.equal(got_q, want)


def test_window_helpers_rotate_through_the_mixer() -> None:
    calls = []

    def rotate(q: Tensor, k: Tensor, pe: Any) -> tuple[Tensor, Tensor]:
        calls.append(pe)
        return q.transpose(1, 2) * 2, k.transpose(1, 2) * 2

    q = torch.randn(1, 3, 2, 8)
    ctx = MixContext(_embeddings(1, 3), None, None, None, {}, rotate)
    assert torch.equal(rope(q, q, ctx)[0], q.transpose(1, 2) * 2) and len(calls) == 1
    plain = MixContext(_embeddings(1, 3), None, None, None, {})  # no mixer: rotate-half
    assert torch.equal(rope(q, q, plain)[0], apply_rope(q.transpose(1, 2), *plain.position_embeddings))


# -- real families -------------------------------------------------------------------------------------


def test_cohere2_global_layers_read_as_nope() -> None:
    sites = find_attention(meta_model("cohere2"))  # tiny config: a sliding layer, then a global one
    assert [s.rotary.convention for s in sites] == ["model", "none"]


def test_hunyuan_norms_after_rope_are_applied_after_it() -> None:
    model = tiny_model("hunyuan_v1_dense")
    site = find_attention(model)[0]
    assert site.rotary.norms_after and site.q_norm is not None
    attn = model.get_submodule(site.path)
    mixer = SoftmaxAttention(site, SoftmaxAttention.Options(), model.config)
    mixer.load_state_dict(read_weights(attn, site))  # query_layernorm / key_layernorm read as q_norm / k_norm
    x = torch.randn(1, 4, model.config.hidden_size)
    pe = model.model.rotary_emb(x, torch.arange(4)[None])
    q, k, _ = mixer.project(x)
    got, _ = mixer.rotate(q, k, pe)
    want = apply_rope(attn.q_proj(x).view(1, 4, -1, site.dims.head_dim).transpose(1, 2), *pe)
    assert torch.equal(got, attn.query_layernorm(want))


def test_llama4_complex_rotary_is_the_models_own() -> None:
    from transformers.models.llama4 import modeling_llama4

    site = find_attention(meta_model("llama4_text"))[0]
    assert site.rotary.function is modeling_llama4.apply_rotary_emb
    assert site.rotary.embeddings == (("freqs_cis", None),) and site.rotary.norms_after  # its L2 qk_norm


def test_nope_layer_with_temperature_tuning_is_refused() -> None:
    model = meta_model("llama4_text")
    model.model.layers[1].self_attn.use_rope = False
    with pytest.raises(AttentionReadError, match=r"model\.layers\.1\.self_attn.*Llama4TextAttention.*temperature"):
        find_attention(model)


def test_codegen_sharded_qkv_split_matches_its_forward() -> None:
    model = tiny_model("codegen")
    x = torch.randn(2, 5, model.config.hidden_size)
    for site in find_attention(model):
        assert site.layout == "fused_qkv_sharded"
        attn, d = model.get_submodule(site.path), site.dims
        weights = read_weights(attn, site)
        # CodeGen's own split: mp_num blocks of [q | v | k].
        local = d.hidden_size // attn.mp_num
        q, v, k = attn.qkv_proj(x).view(2, 5, attn.mp_num, 3 * local).split(local, dim=-1)
        for name, expected in (("q", q), ("k", k), ("v", v)):
            got = nn.functional.linear(x, weights[f"{name}_proj.weight"])
            assert torch.equal(got, expected.reshape(2, 5, -1)), name


def test_a_model_built_on_the_meta_device_reads_its_rotary() -> None:
    """``surgery.load`` first builds the model on the meta device; reading how its attention rotates then probes the
    rotary function with CPU tensors, not meta ones (a fresh process loading a saved model once failed here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.sites import rotary

    rotary._is_rotate_half.cache_clear()  # read afresh, as a fresh process would
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        site = read_rotary("model.layers.0.self_attn", model.model.layers[0].self_attn, 8, ("q_norm", "k_norm"))
    assert site.convention == "rotate_half"
