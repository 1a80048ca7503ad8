"""The ``gsa`` mixer: Liger-GSA, gated slot attention with M memory slots per key/value head.

With pre-RoPE q and k (after the model's q/k norms), raw (no feature map)::

    log alpha_t = logsigmoid(pool_M(k_t)) / gate_normalizer,    s_t = 1 - alpha_t        (pool: mean of D/M dims)
    K~_t = K~_{t-1} diag(alpha_t) + k_t^T s_t                   [D, M]
    V~_t = diag(alpha_t) V~_{t-1} + s_t^T v_t                   [M, D]
    o_t = softmax_M(q_t K~_t) V~_t,    y = o_proj(o)

Scale 1, no new parameters (liger.md section 2.4). The official template sets M = head_dim (an identity pool);
the class default there, and ours, is 64.
"""

from __future__ import annotations

from surgery.hookspecs import hookimpl
from surgery.mixer import Mixer
from surgery.plugins._recurrent import GSAOptions, GSARecurrence, RecurrentMixer


class GSA(RecurrentMixer):
    """Liger-GSA: two chained gated passes through M slots; states ``([D, M], [M, D])`` per key/value head."""

    name = "gsa"
    description = "Liger-GSA: gated slot attention over num_slots slots gated by the average-pooled key."
    default_weights = "copy_qkvo"
    recurrence_cls = GSARecurrence

    class Options(GSAOptions):
        pass


@hookimpl
def surgery_mixers() -> list[type[Mixer]]:
    return [GSA]
