"""A third-party plugin: mixer ``causal_mean`` and weight map ``copy_vo``, registered through the entry point."""

from __future__ import annotations

import torch
from torch import Tensor

from surgery.hookspecs import hookimpl
from surgery.mixer import MixContext, Mixer, Options, WeightMap


class CausalMean(Mixer):
    """Each token mixes the running mean of the values so far: o_t = mean(v_1..v_t) @ W_o."""

    name = "causal_mean"
    description = "running mean of the value projections (a test mixer)"
    default_weights = "copy_vo"

    class Options(Options):
        damping: float = 1.0

    def mix(self, x: Tensor, ctx: MixContext) -> Tensor:
        _, _, v = self.project(x)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=v.dtype).view(1, -1, 1, 1)
        mean = v.cumsum(1) / steps * self.options.damping
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
    return [CausalMean]


@hookimpl
def surgery_weight_maps() -> list[type[WeightMap]]:
    return [CopyVO]
