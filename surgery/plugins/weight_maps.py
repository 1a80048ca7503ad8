"""The ``copy_qkvo`` weight map: the pretrained q/k/v/o projections and q/k norms, copied as they are.

On a multi-head latent attention site the pretrained tensors are the model's own low-rank projections and norms
under their own names (``q_a_proj.weight``, ``kv_b_proj.weight``...), which the mixer owns under the same names.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from surgery.hookspecs import hookimpl
from surgery.mixer import Mixer, WeightMap
from surgery.sites.attention import CANONICAL


class CopyQKVO(WeightMap):
    """Copy every pretrained tensor (q/k/v/o weights and biases, q/k norms; a latent site's own projections) the
    mixer has a same-named parameter for.

    Liger's premise: the pretrained projections are reused as they are, and only the gates are new.
    """

    name = "copy_qkvo"
    description = "Copy the pretrained q/k/v/o projections and q/k norms into the mixer's same-named parameters."

    def __call__(self, src: Mapping[str, Tensor], dst: Mixer) -> dict[str, Tensor]:
        own = dict(dst.named_parameters())
        out: dict[str, Tensor] = {}
        # Canonical names first (the usual case), then a latent site's own names.
        for key in [*CANONICAL, *(k for k in src if k not in CANONICAL)]:
            if key in src and key in own:
                if tuple(src[key].shape) != tuple(own[key].shape):
                    raise ValueError(
                        f"copy_qkvo: pretrained {key} has shape {tuple(src[key].shape)} but {type(dst).__name__} "
                        f"(layer {dst.layer_idx}) expects {tuple(own[key].shape)}"
                    )
                out[key] = src[key]
        return out


@hookimpl
def surgery_weight_maps() -> list[type[WeightMap]]:
    return [CopyQKVO]
