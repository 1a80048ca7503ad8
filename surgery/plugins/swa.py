"""The ``swa`` mixer: the pretrained softmax attention restricted to a sliding window (Liger's SWA branch alone).

Each query sees itself and the ``window`` previous tokens, with the layer's RoPE, scale, GQA and soft-cap
(``surgery.window``), and optionally the first ``sinks`` real tokens of each sequence (attention sinks). The cache
keeps the last ``window`` post-RoPE keys and values and the sinks: constant memory.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from surgery.cache import mixer_cache
from surgery.hookspecs import hookimpl
from surgery.mixer import MixContext, Mixer
from surgery.window import swa_branch


class SlidingWindowAttention(Mixer):
    """The pretrained softmax attention restricted to the last ``window`` tokens (plus itself); no recurrence."""

    name = "swa"
    description = "Sliding-window softmax attention with the pretrained q/k/v/o (Liger's SWA branch alone)."
    default_weights = "copy_qkvo"
    uses_sink_logits = True
    test_options = ({"window": 4}, {"window": 4, "sinks": 2}, {"window": 2, "sinks": 3})

    class Options(Mixer.Options):
        window: int = Field(64, ge=0, description="previous tokens each query sees")
        sinks: int = Field(0, ge=0, description="first real tokens of each sequence every query also sees")

    def mix(self, x: Tensor, ctx: MixContext) -> Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]``; the cache keeps only the last ``window`` keys and values."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        layer = mixer_cache(ctx.cache, self.layer_idx, window=self.options.window)
        o, (kw, vw, valid), aux = swa_branch(q, k, v, ctx, layer, self.options.window, self.scaling,
                                             self.site.dims.softcap, sinks=self.options.sinks,
                                             sink_logits=getattr(self, "sink_logits", None))
        if layer is not None:
            layer.commit(T, keys=kw, values=vw, valid=valid, aux=aux)
        return self.output(o.reshape(B, T, -1).to(x.dtype), x)


@hookimpl
def surgery_mixers() -> list[type[Mixer]]:
    return [SlidingWindowAttention]
