"""The ``hgrn2`` mixer: Liger-HGRN2, where the pretrained key only drives the forget gate.

Per key/value head, with pre-RoPE q and k (after the model's q/k norms)::

    alpha_t = g + (1 - g) sigmoid(k_t)        (g = lower_bound, 0 in Liger)
    S_t = diag(alpha_t) S_{t-1} + (1 - alpha_t)^T v_t,    o_t = softmax(q_t) S_t,    y = o_proj(o)

Scale 1, no normaliser on the gate, no new parameters (liger.md section 2.3).
"""

from __future__ import annotations

from surgery.hookspecs import hookimpl
from surgery.mixer import Mixer
from surgery.plugins._recurrent import HGRN2Options, HGRN2Recurrence, RecurrentMixer


class HGRN2(RecurrentMixer):
    """Liger-HGRN2: input gate ``1 - alpha`` in place of the key, softmax query, one state per key/value head."""

    name = "hgrn2"
    description = "Liger-HGRN2: the key becomes the forget gate alpha and the input 1 - alpha; softmax query."
    default_weights = "copy_qkvo"
    recurrence_cls = HGRN2Recurrence

    class Options(HGRN2Options):
        pass


@hookimpl
def surgery_mixers() -> list[type[Mixer]]:
    return [HGRN2]
