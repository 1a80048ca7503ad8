"""The ``gla`` mixer: Liger-GLA, gated linear attention built from the pretrained q/k/v/o and nothing else.

Per key/value head, with pre-RoPE q and k (after the model's q/k norms, which we keep; the official Liger-Qwen3
code drops them, liger.md section 7.4) and the query heads of a group sharing one state::

    S_t = diag(alpha_t) S_{t-1} + softmax(k_t)^T v_t,    o_t = softmax(q_t) S_t,    y = o_proj(o)
    log alpha_t = logsigmoid(g_t) / gate_normalizer     (one gate per key dimension; g = k, or g_proj(x))

Scale 1, no normaliser, no output norm, no new parameters (liger.md sections 2.1-2.2, 8). Liger's "pooling" of
the key into the gate is an identity at pool size = head dim; ``gate: projection`` with the ``pooled_key_gate``
weight map gives the general pool as a separate ``g_proj``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from surgery.hookspecs import hookimpl
from surgery.mixer import Mixer
from surgery.recurrent import GLAForm, RecurrentMixer, identity_on_padding


class GLA(RecurrentMixer):
    """Liger-GLA: softmax feature maps, per-dimension key gates, one fp32 state ``[K, V]`` per key/value head."""

    name = "gla"
    description = "Liger-GLA: gated linear attention from the pretrained q/k/v/o (softmax features, key gate)."
    default_weights = "copy_qkvo"
    test_options = ({}, {"gate": "projection", "gate_normalizer": 4.0})

    class Options(RecurrentMixer.Options):
        gate_normalizer: float = Field(16.0, gt=0, description="log alpha = logsigmoid(gate) / gate_normalizer")

    def gla_form(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, valid: Tensor | None) -> GLAForm:
        # softmax(dtype=fp32) converts inside the op: the same numbers as q.float().softmax(-1), one pass less
        fq, fk = q.softmax(-1, dtype=torch.float32), k.softmax(-1, dtype=torch.float32)
        gk = F.logsigmoid(gate.float()) / self.options.gate_normalizer
        fk, gk = identity_on_padding(valid, fk, gk)
        return fq, fk, v.float(), gk, None


@hookimpl
def surgery_mixers() -> list[type[Mixer]]:
    return [GLA]
