"""The ``softmax`` mixer: the model's own softmax attention, run through the mixer interface.

It is the identity of the framework. A layer a plan keeps (or converts to ``softmax``) computes exactly what the
pretrained layer computed, bit for bit, through whichever attention function the model is configured with
(``config._attn_implementation``: sdpa, eager, flash, flex), so that a converted model differs from its base
only where the plan says so, and so that the converter itself can be tested for exactness. On a DSA layer it runs a
copy of the model's own indexer and attends only to the keys it selects (``surgery.sites.key_selection``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from surgery.hookspecs import hookimpl
from surgery.mixer import MixContext, Mixer
from surgery.sites.attention import AttentionSite
from surgery.sites.key_selection import select_keys, selection_mask
from surgery.sites.latent import latent_softmax_inputs


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """``[B, Hkv, S, D]`` -> ``[B, Hkv * groups, S, D]``, each key/value head repeated for its query heads."""
    if groups == 1:
        return x
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, groups, S, D).reshape(B, H * groups, S, D)


def eager_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    softcap: float | None = None,
    position_bias: Tensor | None = None,
    bias_in_product: bool = False,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """Plain softmax attention, used when the model's implementation is "eager".

    Transformers resolves "eager" to each model's own function, so there is no shared one to call. This one
    performs the same operations in the same order as those functions (scores in the input dtype, soft-capping,
    then a position bias, then the mask, softmax in fp32), which keeps eager models bit-identical.

    Args:
        query: ``[B, Hq, T, D]``; key, value: ``[B, Hkv, S, D]``; attention_mask: additive ``[B, 1, T, S]``, or
            boolean with True for masked scores (under "eager", transformers' masks are additive: a boolean one is
            a model's own ``.to(bool)`` of it, as MPT does), or None; position_bias: additive, broadcastable to
            ``[B, Hq, T, S]``, or None; bias_in_product: add it inside the scaled product (``baddbmm``), as Bloom
            does, instead of after it.

    Returns:
        ``([B, T, Hq, D], weights [B, Hq, T, S])``.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if position_bias is not None and bias_in_product:
        B, H, T, D = query.shape
        S = key.shape[2]
        bias = position_bias.expand(B, H, -1, S).reshape(B * H, -1, S)
        k = key.reshape(B * H, S, D).transpose(1, 2)
        scores = bias.baddbmm(query.reshape(B * H, T, D), k, beta=1.0, alpha=scaling).view(B, H, T, S)
    else:
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None and not bias_in_product:
        scores = scores + position_bias
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def _with_window(mask: Any, T: int, S: int, window: int, like: Tensor) -> Tensor:
    """``mask`` with the keys ahead of each query or ``window`` or more positions behind it masked too, for layers
    whose model builds only a causal mask (GPT-Neo's local layers). The T queries are the last T of the S keys.

    The causal window is added as its own ``finfo.min`` term, as GPT-Neo fills those scores before adding the
    model's mask, so that rows the model masks entirely (padding) stay identical too. Returns an additive
    ``[B | 1, 1, T, S]`` mask in ``like``'s dtype, or a boolean one (True = attend, as SDPA masks are) when
    ``mask`` is boolean.
    """
    behind = torch.arange(S - T, S, device=like.device)[:, None] - torch.arange(S, device=like.device)[None, :]
    inside = (behind >= 0) & (behind < window)  # [T, S]
    if isinstance(mask, Tensor) and mask.dtype == torch.bool:
        return mask & inside
    own = torch.zeros(T, S, dtype=like.dtype, device=like.device).masked_fill(~inside, torch.finfo(like.dtype).min)
    return own[None, None] if mask is None else mask + own


class SoftmaxAttention(Mixer):
    """Softmax attention with the pretrained layer's projections, norms, RoPE, window, soft-cap and cache."""

    name = "softmax"
    description = "The model's own softmax attention, unchanged (identity; kept layers)."
    default_weights = "copy_qkvo"
    uses_sink_logits = True
    uses_key_selection = True
    keeps_kv_cache = True

    class Options(Mixer.Options):
        pass

    def __init__(self, site: AttentionSite, options: Options, config: Any) -> None:
        super().__init__(site, options, config)
        # Same attention dropout as the pretrained layer, so that training a kept layer is unchanged too.
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)

    @property
    def sinks(self) -> Tensor | None:
        """The learned sink logits ``[Hq]`` under the name families' own eager functions read (``module.sinks``)."""
        return getattr(self, "sink_logits", None)

    def _attention_function(self) -> Callable[..., tuple[Tensor, Any]]:
        implementation = getattr(self.config, "_attn_implementation", None) or "eager"
        extras = self.site.extras
        # Families formulate sink logits differently (an extra column, a log-sum-exp rescaling): only their own
        # eager function reproduces their logits bit for bit.
        sinks = extras is not None and extras.sink_logits
        if sinks and implementation == "sdpa":
            raise ValueError(f"{self.site.path} ({self.site.module_class}): learned sink logits cannot run under sdpa "
                             "(it has no extra softmax logit); use eager, flash or flex attention")  # fmt: skip
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, extras.eager if sinks else eager_attention)

    def _select_keys(self, x: Tensor, q_latent: Tensor | None, ctx: MixContext, num_keys: int) -> Tensor | None:
        """The indices ``[B, T, k]`` of the keys each query sees: from this layer's copy of the model's indexer
        (which appends its own keys to the cache), or the previous layer's on a layer that reuses them.

        None (every key) only on a layer that reuses a selection, called without one and without a mask: a call
        outside the model (the converter's probe); the DSA models always pass a mask.
        """
        selection = self.site.key_selection
        assert selection is not None
        if selection.shared:
            if ctx.previous_selection is None and ctx.attention_mask is None:
                return None
            if ctx.previous_selection is None:
                raise ValueError(f"{self.site.path} ({self.site.module_class}): this layer reuses the key selection "
                                 "of the layer before it, which passed none: keep that layer's indexer (softmax) "
                                 "too")  # fmt: skip
            return ctx.previous_selection
        indexer = getattr(self, selection.name)
        return select_keys(indexer, selection, x, q_latent, ctx.position_embeddings, ctx.attention_mask, ctx.cache,
                           num_keys)  # fmt: skip

    def mix(self, x: Tensor, ctx: MixContext) -> Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]``, appending this call's keys and values to ``ctx.cache``."""
        B, T, _ = x.shape
        q_latent = None
        if self.site.latent is not None:
            # Latent attention caches its compressed latent, as the pretrained layer does.
            q, k, v, parts = latent_softmax_inputs(self, x, self.site.latent, self.num_heads, ctx.position_embeddings,
                                                   ctx.cache, kwargs=ctx.attn_kwargs)  # fmt: skip
            q_latent = parts.q_latent
            self.keep_latent_gate(x, parts.gate)
        else:
            q, k, v = self.project(x)
            q, k = self.rotate(q, k, ctx.position_embeddings)  # [B, H, T, D]
            v = v.transpose(1, 2)
            if ctx.cache is not None:
                k, v = ctx.cache.update(k, v, self.layer_idx, kwargs=ctx.attn_kwargs)
        q = ctx.scale_queries(q)
        mask = ctx.attention_mask
        if self.site.key_selection is not None:
            ctx.selection = self._select_keys(x, q_latent, ctx, k.shape[2])
            if ctx.selection is not None:
                mask = selection_mask(ctx.selection, mask, k.shape[2], x.dtype)
        window = self.site.dims.sliding_window
        if window is not None and not self.site.dims.window_in_mask:
            mask = _with_window(mask, T, k.shape[2], window, q)
        # Only pass what the pretrained layer passes: sdpa refuses any softcap key, even None.
        extra: dict[str, Any] = {}
        if self.site.dims.sliding_window is not None:
            extra["sliding_window"] = self.site.dims.sliding_window
        if self.site.dims.softcap is not None:
            extra["softcap"] = self.site.dims.softcap
        if self.sinks is not None:
            extra["s_aux"] = self.sinks  # the name transformers' flash/flex functions (and GPT-OSS's) take
        if ctx.position_bias is not None:
            bias = ctx.position_bias[..., -k.shape[2] :]  # the columns of this call's keys
            extra["position_bias"] = bias.reshape(-1, self.num_heads, *bias.shape[-2:])  # [1 | B, H, 1 | T, S]
            if ctx.bias_in_product and self._attention_function() is eager_attention:
                extra["bias_in_product"] = True  # other implementations add it after the product
        out, _ = self._attention_function()(
            self,
            q,
            k,
            v,
            mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **extra,
            **ctx.attn_kwargs,
        )
        return self.output(out.reshape(B, T, -1).contiguous(), x)


@hookimpl
def surgery_mixers() -> list[type[Mixer]]:
    return [SoftmaxAttention]
