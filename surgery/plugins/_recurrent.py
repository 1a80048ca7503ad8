"""The gated recurrences of Liger (GLA, HGRN2, GSA) and the mixer base that runs them with a cache.

Every recurrence reads the pretrained projections only: pre-RoPE q and k (after the model's own q/k norms, which
we keep; the official Liger-Qwen3 code drops them, liger.md section 7.4), v, and a gate source that is the key
itself (Liger's "pooling" of the key projection is an identity for GLA and HGRN2, liger.md section 2.1) or, with
``gate: projection``, a separate ``g_proj`` (raw projection of x, no norm) that a weight map may initialise.

All of them are ``S_t = diag(alpha_t) S_{t-1} + k~_t^T v_t`` with per-dimension log gates, scale 1, no normaliser
and no output norm, one state per key/value head (query heads of a group read it; nothing is repeated), computed in
fp32 by the kernels of ``surgery.kernels``. Left padding is an identity step: a padded token writes nothing and
decays nothing, so a left-padded row ends in the same state as the unpadded row.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from surgery.attention import AttentionDims, AttentionSite
from surgery.cache import MixerCacheLayer, State, mixer_cache
from surgery.kernels.gla import chunk_gla, fused_recurrent_gla
from surgery.kernels.gsa import chunk_gsa, fused_recurrent_gsa
from surgery.mixer import MixContext, Mixer, MixerDimsError, Options


class GateOptions(Options):
    gate: Literal["key", "projection"] = Field(
        "key",
        description="gate source: the mixer's key (Liger), or its own g_proj (see the pooled_key_gate weight map)",
    )


class GLAOptions(GateOptions):
    gate_normalizer: float = Field(16.0, gt=0, description="log alpha = logsigmoid(gate) / gate_normalizer")


class HGRN2Options(GateOptions):
    lower_bound: float = Field(
        0.0, ge=0.0, lt=1.0, description="alpha = lower_bound + (1 - lower_bound) sigmoid(gate)"
    )


class GSAOptions(GateOptions):
    num_slots: int = Field(64, ge=1, description="memory slots M per key/value head; must divide head_dim")
    gate_normalizer: float = Field(16.0, gt=0, description="log alpha = logsigmoid(pool(gate)) / gate_normalizer")


def _identity_on_padding(valid: Tensor | None, *xs: Tensor) -> tuple[Tensor, ...]:
    """Zero ``xs`` (writes and log gates ``[B, T, H, *]``) where ``valid`` ``[B, T]`` is False."""
    if valid is None:
        return xs
    m = valid[:, :, None, None].to(xs[0].dtype)
    return tuple(x * m for x in xs)


def gla(
    q: Tensor, k: Tensor, v: Tensor, gk: Tensor | None, gv: Tensor | None, state: Tensor | None, want_state: bool
) -> tuple[Tensor, Tensor | None]:
    """One GLA kernel call (scale 1): the token loop for a single token (decoding), the chunked form otherwise."""
    fn = fused_recurrent_gla if q.shape[1] == 1 else chunk_gla
    return fn(q, k, v, gk=gk, gv=gv, scale=1.0, initial_state=state, output_final_state=want_state)


class Recurrence:
    """A gated recurrence with its options. ``__call__`` maps pre-RoPE ``q``/``k``/``v`` to ``[B, T, Hq, D]``.

    Args of ``__call__``:
        q: ``[B, T, Hq, D]``; k, v, gate: ``[B, T, Hkv, D]``.
        valid: ``[B, T]`` bool (False: left padding) or None.
        state: the cached state tuple, or None to start from zeros.
        want_state: return the final state tuple (otherwise None).
    """

    name: ClassVar[str]
    Options: ClassVar[type[GateOptions]]

    def __init__(self, options: GateOptions) -> None:
        self.options = options

    @classmethod
    def check_dims(cls, dims: AttentionDims, options: GateOptions) -> None:
        """Raise ``MixerDimsError`` when the recurrence cannot run on these dims. Default: accept."""

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        gate: Tensor,
        valid: Tensor | None,
        state: State | None,
        want_state: bool,
    ) -> tuple[Tensor, State | None]:
        raise NotImplementedError


class GLARecurrence(Recurrence):
    """Liger-GLA: ``phi = softmax`` over the head dim for q and k, ``log alpha = logsigmoid(gate) / normalizer``."""

    name = "gla"
    Options = GLAOptions

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        gate: Tensor,
        valid: Tensor | None,
        state: State | None,
        want_state: bool,
    ) -> tuple[Tensor, State | None]:
        fq, fk = q.float().softmax(-1), k.float().softmax(-1)
        gk = F.logsigmoid(gate.float()) / self.options.gate_normalizer
        fk, gk = _identity_on_padding(valid, fk, gk)
        o, s = gla(fq, fk, v.float(), gk, None, state[0] if state else None, want_state)
        return o, ((s,) if want_state else None)


class HGRN2Recurrence(Recurrence):
    """Liger-HGRN2: q through softmax; the key enters only through the gate, ``k~ = 1 - alpha``.

    ``alpha = g + (1 - g) sigmoid(gate)`` with ``g = lower_bound``, in log space:
    ``log alpha = logaddexp(log g, log(1 - g) + logsigmoid(gate))`` and ``1 - alpha = (1 - g) sigmoid(-gate)``,
    which stay exact where ``alpha`` rounds to 1.
    """

    name = "hgrn2"
    Options = HGRN2Options

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        gate: Tensor,
        valid: Tensor | None,
        state: State | None,
        want_state: bool,
    ) -> tuple[Tensor, State | None]:
        g, lb = gate.float(), self.options.lower_bound
        log_alpha = F.logsigmoid(g)
        kt = torch.sigmoid(-g)
        if lb > 0:
            log_alpha = torch.logaddexp(torch.full_like(g, math.log(lb)), math.log1p(-lb) + log_alpha)
            kt = (1.0 - lb) * kt
        kt, log_alpha = _identity_on_padding(valid, kt, log_alpha)
        o, s = gla(q.float().softmax(-1), kt, v.float(), log_alpha, None, state[0] if state else None, want_state)
        return o, ((s,) if want_state else None)


class GSARecurrence(Recurrence):
    """Liger-GSA: M slots per key/value head, gates from the gate source average-pooled to M, ``s = 1 - alpha``.

    Two chained passes (``surgery.kernels.gsa``): ``K~_t = K~_{t-1} diag(alpha_t) + k_t^T s_t``,
    ``p_t = softmax(q_t K~_t)``, ``V~_t = diag(alpha_t) V~_{t-1} + s_t^T v_t``, ``o_t = p_t V~_t``; q, k, v raw.
    """

    name = "gsa"
    Options = GSAOptions

    @classmethod
    def check_dims(cls, dims: AttentionDims, options: GateOptions) -> None:
        m = options.num_slots  # type: ignore[attr-defined]
        if m > dims.head_dim or dims.head_dim % m:
            divisors = [d for d in range(1, dims.head_dim + 1) if dims.head_dim % d == 0]
            raise MixerDimsError(
                f"num_slots={m} must divide head_dim={dims.head_dim} (slots average head_dim / num_slots adjacent "
                f"key dims); choose one of {divisors}"
            )

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        gate: Tensor,
        valid: Tensor | None,
        state: State | None,
        want_state: bool,
    ) -> tuple[Tensor, State | None]:
        B, T, H, D = gate.shape
        m = self.options.num_slots
        pooled = gate.float().view(B, T, H, m, D // m).mean(-1)
        g = F.logsigmoid(pooled) / self.options.gate_normalizer
        s = -torch.expm1(g)  # 1 - alpha, exact for alpha near 1
        s, g = _identity_on_padding(valid, s, g)
        fn = fused_recurrent_gsa if T == 1 else chunk_gsa
        o, st = fn(
            q.float(), k.float(), v.float(), s, g, scale=1.0, initial_state=state, output_final_state=want_state
        )
        return o, (tuple(st) if want_state else None)


RECURRENCES: dict[str, type[Recurrence]] = {r.name: r for r in (GLARecurrence, HGRN2Recurrence, GSARecurrence)}


class GatedMixer(Mixer):
    """A mixer that runs one ``Recurrence``. Builds ``g_proj`` when the options say ``gate: projection``."""

    recurrence_cls: ClassVar[type[Recurrence]]

    @classmethod
    def recurrence_of(cls, options: Any) -> tuple[type[Recurrence], GateOptions]:
        """The recurrence class and its options for these mixer options (Liger Attention overrides this)."""
        return cls.recurrence_cls, options

    @classmethod
    def check_site(cls, site: AttentionSite, options: Any) -> None:
        rec_cls, rec_options = cls.recurrence_of(options)
        rec_cls.check_dims(site.dims, rec_options)

    def __init__(self, site: AttentionSite, options: Any, config: Any) -> None:
        super().__init__(site, options, config)
        rec_cls, rec_options = self.recurrence_of(options)
        rec_cls.check_dims(site.dims, rec_options)
        self.recurrence = rec_cls(rec_options)
        d = site.dims
        # A registered attribute either way, so state dicts and weight maps see a stable structure.
        self.g_proj: nn.Linear | None = (
            nn.Linear(d.hidden_size, d.num_kv_heads * d.head_dim, bias=d.qkv_bias)
            if rec_options.gate == "projection"
            else None
        )

    def recur(
        self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: MixContext, layer: MixerCacheLayer | None
    ) -> tuple[Tensor, State | None]:
        """Run the recurrence from the cached state; returns ``[B, T, Hq, D]`` fp32 and the new state (if cached)."""
        gate = k if self.g_proj is None else self.g_proj(x).view(k.shape)
        state = layer.states if layer is not None else None
        return self.recurrence(q, k, v, gate, ctx.padding_mask, state, layer is not None)


class RecurrentMixer(GatedMixer):
    """Project, run the recurrence, project out: the purely recurrent mixers (gla, hgrn2, gsa)."""

    def mix(self, x: Tensor, ctx: MixContext) -> Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]``; continues and updates the layer's state in ``ctx.cache``."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        layer = mixer_cache(ctx.cache, self.layer_idx)
        o, state = self.recur(x, q, k, v, ctx, layer)
        if layer is not None:
            layer.commit(T, states=state)
        return self.o_proj(o.reshape(B, T, -1).to(x.dtype))
