"""The ``liger_attention`` mixer (Liger Attention: sliding-window softmax + gated recurrence) and ``swa``.

Liger Attention mixes two branches that share the pretrained q, k, v (liger.md section 3)::

    y = o_proj( w_swa * SWA(q, k, v) + w_rec * REC(q, k, v) )

SWA is the pretrained softmax attention (RoPE, the layer's scale, GQA) where each query sees itself and the
``window`` previous tokens (Liger: 64, i.e. 65 keys); REC is one of the recurrences gla, hgrn2, gsa on the pre-RoPE
q and k. Liger fixes ``w_swa = w_rec = 0.5`` and reports that the weights summing to 1 matters. The cache keeps the
recurrent state and the last ``window`` post-RoPE keys/values, so decoding is exact (the official code kept no
window and decoded with SWA(q_t) = v_t, liger.md section 6).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from torch import Tensor

from surgery.cache import mixer_cache
from surgery.hookspecs import hookimpl
from surgery.mixer import MixContext, Mixer
from surgery.plugins._recurrent import RECURRENCES, GatedMixer, GateOptions, Recurrence
from surgery.plugins._swa import swa_branch

_RECURRENCE_KNOBS = ("gate_normalizer", "lower_bound", "num_slots")


class LigerAttention(GatedMixer):
    """``w_swa * SWA + w_rec * REC`` on shared projections; cache: recurrent state(s) + a key/value window."""

    name = "liger_attention"
    description = "Liger Attention: 0.5 sliding-window softmax attention (64 tokens) + 0.5 gated recurrence (gla)."
    default_weights = "copy_qkvo"

    class Options(Mixer.Options):
        recurrent: Literal["gla", "hgrn2", "gsa"] = Field("gla", description="the recurrent branch")
        window: int = Field(64, ge=0, description="previous tokens each query sees in the softmax branch")
        w_swa: float = Field(0.5, description="weight of the sliding-window branch")
        w_rec: float = Field(0.5, description="weight of the recurrent branch")
        gate: Literal["key", "projection"] = Field("key", description="gate source (see the gla mixer)")
        gate_normalizer: float | None = Field(None, gt=0, description="gla/gsa; None: their default, 16")
        lower_bound: float | None = Field(None, ge=0.0, lt=1.0, description="hgrn2; None: its default, 0")
        num_slots: int | None = Field(None, ge=1, description="gsa; None: its default, 64")

        @model_validator(mode="after")
        def _knobs_fit_recurrence(self) -> LigerAttention.Options:
            self.recurrence_options()
            return self

        def recurrence_options(self) -> GateOptions:
            """The options of the chosen recurrence; knobs of another recurrence are an error, not ignored."""
            rec_options = RECURRENCES[self.recurrent].Options
            given = {n: getattr(self, n) for n in _RECURRENCE_KNOBS if getattr(self, n) is not None}
            wrong = sorted(n for n in given if n not in rec_options.model_fields)
            if wrong:
                takes = sorted(n for n in rec_options.model_fields if n in _RECURRENCE_KNOBS)
                verb = "does" if len(wrong) == 1 else "do"
                raise ValueError(
                    f"{', '.join(wrong)} {verb} not apply to recurrent: {self.recurrent} "
                    f"(it takes {', '.join(takes) or 'none of gate_normalizer, lower_bound, num_slots'})"
                )
            return rec_options(gate=self.gate, **given)

    @classmethod
    def recurrence_of(cls, options: Any) -> tuple[type[Recurrence], GateOptions]:
        return RECURRENCES[options.recurrent], options.recurrence_options()

    def mix(self, x: Tensor, ctx: MixContext) -> Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]``; continues the cached state and window."""
        B, T, _ = x.shape
        opts = self.options
        q, k, v = self.project(x)
        layer = mixer_cache(ctx.cache, self.layer_idx, window=opts.window)
        rec, state = self.recur(x, q, k, v, ctx, layer)
        swa, (kw, vw, valid) = swa_branch(q, k, v, ctx, layer, opts.window, self.scaling, self.site.dims.softcap)
        if layer is not None:
            layer.commit(T, states=state, keys=kw, values=vw, valid=valid)
        o = opts.w_swa * swa.float() + opts.w_rec * rec
        return self.o_proj(o.reshape(B, T, -1).to(x.dtype))


class SlidingWindowAttention(Mixer):
    """The pretrained softmax attention restricted to the last ``window`` tokens (plus itself); no recurrence."""

    name = "swa"
    description = "Sliding-window softmax attention with the pretrained q/k/v/o (Liger's SWA branch alone)."
    default_weights = "copy_qkvo"

    class Options(Mixer.Options):
        window: int = Field(64, ge=0, description="previous tokens each query sees")

    def mix(self, x: Tensor, ctx: MixContext) -> Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]``; the cache keeps only the last ``window`` keys and values."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        layer = mixer_cache(ctx.cache, self.layer_idx, window=self.options.window)
        o, (kw, vw, valid) = swa_branch(q, k, v, ctx, layer, self.options.window, self.scaling, self.site.dims.softcap)
        if layer is not None:
            layer.commit(T, keys=kw, values=vw, valid=valid)
        return self.o_proj(o.reshape(B, T, -1).to(x.dtype))


@hookimpl
def surgery_mixers() -> list[type[Mixer]]:
    return [LigerAttention, SlidingWindowAttention]
