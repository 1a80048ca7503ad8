"""Tiny randomly initialised causal LMs, one per supported attention layout, built from configs (no hub).

Every model is fp32, in eval mode and seeded. Shapes are small enough that a forward pass takes milliseconds
on two CPU cores, yet each architecture keeps the features that make its attention special: GQA, explicit
head dims that differ from ``hidden / heads``, q/k biases, q/k norms, sliding-window and global layers,
fused and head-interleaved qkv projections, partial rotary.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MiMoV2FlashConfig,
    MiMoV2FlashForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gpt_neox"]

#: Shared by every architecture; token ids stay inside the vocabulary (HF defaults such as Phi-3's pad 32000 do not).
_COMMON: dict[str, Any] = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    # 0.02 makes every attention row nearly uniform, which would hide scaling, RoPE and mask bugs.
    initializer_range=0.1,
)  # fmt: skip

#: Sequences in the tests are longer than this, so sliding layers really drop keys.
WINDOW = 4

_SPECS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], dict[str, Any]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2)),
    # Mistral without layer_types: one window for every layer, read from the config.
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=1, sliding_window=WINDOW)),
    # Qwen2: q/k/v biases but no o bias; layers from max_window_layers on use the window.
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    # Qwen3: per-head q/k RMSNorm and a head dim unrelated to hidden / heads.
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=24)),
    # Gemma3: q/k norms with 1 + w weights, sliding and global layers, scaling from query_pre_attn_scalar.
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),  # fmt: skip
    # Phi-3: fused [q | k | v] rows, GQA, half of each head rotated.
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(num_key_value_heads=2, partial_rotary_factor=0.5)),
    # GPT-NeoX: head-interleaved query_key_value with biases, a quarter of each head rotated.
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, dict(rotary_pct=0.25, attention_bias=True)),
    # Gemma2 is kept out of ARCHS: its soft-capped attention runs in eager mode only (sdpa refuses soft-capping).
    # A small cap makes tanh bend the scores, so dropping it changes the logits.
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        dict(
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
            attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),  # fmt: skip
    # Kept out of ARCHS too (tests/test_latent.py): multi-head latent attention, interleaved RoPE on 8 of 24 q/k
    # dims, value head dim 12. One key/value head per query head, as the latent expands to.
    "deepseek_v3": (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        dict(
            num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12, head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            n_group=1, topk_group=1, first_k_dense_replace=3,
        ),
    ),  # fmt: skip
    # MiMo-V2 with full-attention layers only (its sliding layers have sinks): value head dim 24 != q/k head dim 16,
    # values scaled by attention_value_scale.
    "mimo_v2_flash": (
        MiMoV2FlashConfig,
        MiMoV2FlashForCausalLM,
        dict(
            num_key_value_heads=2, head_dim=16, v_head_dim=24, attention_value_scale=0.7,
            layer_types=["full_attention"] * 3, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        ),
    ),  # fmt: skip
}

#: The attention implementation a model gets when the caller names none.
_DEFAULT_IMPLEMENTATION = {"gemma2": "eager", "mimo_v2_flash": "eager"}  # MiMo refuses sdpa


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """The config ``tiny_model`` builds ``arch`` from; ``overrides`` replace any field."""
    if arch not in _SPECS:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {', '.join(_SPECS)}")
    config_cls, _, extra = _SPECS[arch]
    kwargs = {**_COMMON, **extra, **overrides}
    return config_cls(**kwargs)


def tiny_model(arch: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny ``arch`` causal LM (fp32, eval mode) with seeded random weights.

    ``attn_implementation`` is accepted among ``overrides`` and set on the model ("sdpa" when absent, "eager" for
    the soft-capped Gemma2). One-dimensional
    parameters (biases, norm weights) are perturbed, because their HF initial values (zeros, ones) would hide a
    mixer that drops a bias or an ``1 + w`` norm offset, and would make layers differ only in their matrices.
    """
    attn_implementation = overrides.pop("attn_implementation", _DEFAULT_IMPLEMENTATION.get(arch, "sdpa"))
    config = tiny_config(arch, **overrides)
    _, model_cls, _ = _SPECS[arch]
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    model.set_attn_implementation(attn_implementation)
    return model.float().eval()


def meta_model(arch: str, **overrides: Any) -> PreTrainedModel:
    """``arch`` built on the meta device: the shapes of ``tiny_model(arch)`` with no storage behind them."""
    config = tiny_config(arch, **overrides)
    with torch.device("meta"):
        return _SPECS[arch][1](config)
