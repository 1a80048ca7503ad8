"""The ``gsa`` mixer: Liger-GSA, gated slot attention with M memory slots per key/value head.

With pre-RoPE q and k (after the model's q/k norms), raw (no feature map)::

    log alpha_t = logsigmoid(pool_M(g_t)) / gate_normalizer,    s_t = 1 - alpha_t        (pool: mean of D/M dims)
    K~_t = K~_{t-1} diag(alpha_t) + k_t^T s_t                   [D, M]
    V~_t = diag(alpha_t) V~_{t-1} + s_t^T v_t                   [M, D]
    o_t = softmax_M(q_t K~_t) V~_t,    y = o_proj(o)

Scale 1, no new parameters (liger.md section 2.4). Two chained passes of the GLA family (``surgery.kernels.gsa``).
The official template sets M = head_dim (an identity pool), its class default is 64; ours is the largest divisor of
the head dim up to 64, chosen per model and recorded in the manifest, so the default fits any head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from surgery.hookspecs import hookimpl
from surgery.kernels.gsa import chunk_gsa, fused_recurrent_gsa
from surgery.mixer import Mixer, MixerDimsError
from surgery.recurrent import RecurrentMixer, State, identity_on_padding
from surgery.sites.attention import AttentionSite

DEFAULT_MAX_SLOTS = 64


class GSA(RecurrentMixer):
    """Liger-GSA: two chained gated passes through M slots; states ``([D, M], [M, D])`` per key/value head."""

    name = "gsa"
    description = "Liger-GSA: gated slot attention over num_slots slots gated by the average-pooled key."
    default_weights = "copy_qkvo"
    test_options = ({}, {"num_slots": 4})

    class Options(RecurrentMixer.Options):
        num_slots: int | None = Field(
            None, ge=1, description="memory slots M per key/value head, dividing head_dim; None: largest up to 64"
        )
        gate_normalizer: float = Field(16.0, gt=0, description="log alpha = logsigmoid(pool(gate)) / gate_normalizer")

    @classmethod
    def resolve_options(cls, site: AttentionSite, options: Options) -> Options:
        if options.num_slots is not None:
            return options
        d = site.dims.head_dim
        m = max(x for x in range(1, min(d, DEFAULT_MAX_SLOTS) + 1) if d % x == 0)
        return options.model_copy(update={"num_slots": m})

    @classmethod
    def check_site(cls, site: AttentionSite, options: Options) -> None:
        m, d = options.num_slots, site.dims.head_dim
        if m is not None and (m > d or d % m):
            divisors = [x for x in range(1, d + 1) if d % x == 0]
            raise MixerDimsError(
                f"num_slots={m} must divide head_dim={d} (slots average head_dim / num_slots adjacent key dims); "
                f"choose one of {divisors}"
            )

    def recur(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        gate: Tensor,
        valid: Tensor | None,
        state: State | None,
        want_state: bool,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, State | None]:
        B, T, H, D = gate.shape
        m = self.options.num_slots
        pooled = gate.float().view(B, T, H, m, D // m).mean(-1)
        g = F.logsigmoid(pooled) / self.options.gate_normalizer
        s = -torch.expm1(g)  # 1 - alpha, exact for alpha near 1
        s, g = identity_on_padding(valid, s, g)
        fn = fused_recurrent_gsa if T == 1 and cu_seqlens is None else chunk_gsa
        o, st = fn(q.float(), k.float(), v.float(), s, g, scale=1.0, initial_state=state,
                   output_final_state=want_state, cu_seqlens=cu_seqlens)  # fmt: skip
        return o, (tuple(st) if want_state else None)


@hookimpl
def surgery_mixers() -> list[type[Mixer]]:
    return [GSA]
