"""The ``hgrn2`` mixer: Liger-HGRN2, where the pretrained key only drives the forget gate.

Per key/value head, with pre-RoPE q and k (after the model's q/k norms)::

    alpha_t = g + (1 - g) sigmoid(k_t)        (g = lower_bound, 0 in Liger)
    S_t = diag(alpha_t) S_{t-1} + (1 - alpha_t)^T v_t,    o_t = softmax(q_t) S_t,    y = o_proj(o)

Scale 1, no normaliser on the gate, no new parameters (liger.md section 2.3). In log space,
``log alpha = logaddexp(log g, log(1 - g) + logsigmoid(k))`` and ``1 - alpha = (1 - g) sigmoid(-k)``, which stay
exact where ``alpha`` rounds to 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from surgery.hookspecs import hookimpl
from surgery.mixer import Mixer
from surgery.recurrent import GLAForm, RecurrentMixer, identity_on_padding


class HGRN2(RecurrentMixer):
    """Liger-HGRN2: input gate ``1 - alpha`` in place of the key, softmax query, one state per key/value head."""

    name = "hgrn2"
    description = "Liger-HGRN2: the key becomes the forget gate alpha and the input 1 - alpha; softmax query."
    default_weights = "copy_qkvo"
    test_options = ({}, {"lower_bound": 0.3})

    class Options(RecurrentMixer.Options):
        lower_bound: float = Field(
            0.0, ge=0.0, lt=1.0, description="alpha = lower_bound + (1 - lower_bound) sigmoid(gate)"
        )

    def gla_form(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, valid: Tensor | None) -> GLAForm:
        g, lb = gate.float(), self.options.lower_bound
        log_alpha = F.logsigmoid(g)
        kt = torch.sigmoid(-g)
        if lb > 0:
            log_alpha = torch.logaddexp(torch.full_like(g, math.log(lb)), math.log1p(-lb) + log_alpha)
            kt = (1.0 - lb) * kt
        kt, log_alpha = identity_on_padding(valid, kt, log_alpha)
        return q.softmax(-1, dtype=torch.float32), kt, v.float(), log_alpha, None


@hookimpl
def surgery_mixers() -> list[type[Mixer]]:
    return [HGRN2]
