"""A third-party plugin: mixers ``causal_mean`` and ``retention`` (recurrent, its own module) and weight map
``copy_vo``, registered through the entry point."""

from __future__ import annotations

import torch
from torch import Tensor

from surgery.testing import MixContext, Mixer, Options, WeightMap, hookimpl, mixer_cache
from surgery_example.retention import Retention


class CausalMean(Mixer):
    """Each token mixes the running mean of the values so far: o_t = mean(v_1..v_t) @ W_o."""

    name = "causal_mean"
    description = "running mean of the value projections (a test mixer)"
    default_weights = "copy_vo"

    class Options(Options):
        damping: float = 1.0

    def mix(self, x: Tensor, ctx: MixContext) -> Tensor:
        _, _, v = self.project(x)  # [B, T, Hkv, D]
        real = torch.ones(v.shape[:2], dtype=v.dtype, device=v.device)
        if ctx.padding_mask is not None:  # left padding counts for nothing
            real = ctx.padding_mask.to(v.dtype)
        v = v * real[:, :, None, None]
        layer = mixer_cache(ctx.cache, self.layer_idx)
        total, count = layer.states if layer is not None and layer.states else (v.new_zeros(1), v.new_zeros(1))
        sums = total[:, None] + v.cumsum(1)  # the state: the running sum [B, Hkv, D] and count [B] of real tokens
        counts = (count[:, None] + real.cumsum(1))[:, :, None, None]
        if layer is not None:
            layer.commit(x.shape[1], states=(sums[:, -1], counts[:, -1, 0, 0]))
        mean = sums / counts.clamp(min=1) * self.options.damping
        mean = mean.repeat_interleave(self.num_key_value_groups, dim=2)
        return self.o_proj(mean.flatten(2))


class CopyVO(WeightMap):
    """Copy only the value and output projections."""

    name = "copy_vo"
    description = "copy v_proj and o_proj (a test weight map)"

    def __call__(self, src: dict[str, Tensor], dst: Mixer) -> dict[str, Tensor]:
        return {k: t for k, t in src.items() if k.split(".")[0] in ("v_proj", "o_proj")}


@hookimpl
def surgery_mixers() -> list[type[Mixer]]:
    return [CausalMean, Retention]


@hookimpl
def surgery_weight_maps() -> list[type[WeightMap]]:
    return [CopyVO]
