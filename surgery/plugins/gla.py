"""The ``gla`` mixer: Liger-GLA, gated linear attention built from the pretrained q/k/v/o and nothing else.

Per key/value head, with pre-RoPE q and k (after the model's q/k norms) and the query heads of a group sharing
one state::

    S_t = diag(alpha_t) S_{t-1} + softmax(k_t)^T v_t,    o_t = softmax(q_t) S_t,    y = o_proj(o)
    log alpha_t = logsigmoid(k_t) / gate_normalizer     (one gate per key dimension)

Scale 1, no normaliser, no output norm, no new parameters (liger.md sections 2.1-2.2, 8).
"""

from __future__ import annotations

from surgery.hookspecs import hookimpl
from surgery.mixer import Mixer
from surgery.plugins._recurrent import GLAOptions, GLARecurrence, RecurrentMixer


class GLA(RecurrentMixer):
    """Liger-GLA: softmax feature maps, per-dimension key gates, one fp32 state ``[K, V]`` per key/value head."""

    name = "gla"
    description = "Liger-GLA: gated linear attention from the pretrained q/k/v/o (softmax features, key gate)."
    default_weights = "copy_qkvo"
    recurrence_cls = GLARecurrence

    class Options(GLAOptions):
        pass


@hookimpl
def surgery_mixers() -> list[type[Mixer]]:
    return [GLA]
