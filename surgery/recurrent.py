"""The public base of gated-recurrence mixers: the recurrence contract, the gate source, the cache, varlen.

A recurrent mixer is one module that subclasses ``RecurrentMixer`` and implements ``recur``, its formula::

    recur(q, k, v, gate, valid, state, want_state, cu_seqlens) -> (o, state)

with pre-RoPE ``q`` ``[B, T, Hq, D]`` (after the model's q norm), ``k``, ``v`` and ``gate`` ``[B, T, Hkv, D]``.
The base does the rest: projections, the gate source (the key itself, or its own ``g_proj`` with
``gate: projection``), the layer's cache (one commit per call), left padding and the output projection. The same
``recur`` serves three callers, which is why the formula is separate from the module:

- the mixer on its own (``mix``);
- ``liger_attention``, whose recurrent branch is any registered recurrent mixer built with ``projections=False``
  (it shares the parent's q/k/v) and called through ``recurrent_output``;
- ``mom``, which packs the tokens routed to each memory into variable-length segments and runs one ``recur`` over
  all of them with ``cu_seqlens`` (``B = 1``; ``state`` then holds one entry per segment).

Every built-in recurrence is ``S_t = diag(alpha_t) S_{t-1} + k~_t^T v_t`` (GSA chains two) computed in fp32 by
``surgery.kernels``, one state per key/value head. Left padding is an identity step (``identity_on_padding``): a
padded token writes nothing and decays nothing, so a left-padded row ends in the same state as the unpadded row.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field
from torch import Tensor, nn

from surgery.cache import State, mixer_cache
from surgery.kernels.gla import chunk_gla, fused_recurrent_gla, torch_gla_state
from surgery.mixer import MixContext, Mixer
from surgery.options import Named
from surgery.sites.attention import AttentionSite

__all__ = ["GLAForm", "RecurrentMixer", "State", "RecurrentBranch", "identity_on_padding", "run_gla"]

#: One GLA call: ``(q, k, v, gk, gv)`` with q ``[B, T, Hq, K]`` fp32 (features, scale folded in), k and gk
#: ``[B, T, Hkv, K]``, v and gv ``[B, T, Hkv, V]`` (gk/gv natural-log decays <= 0, or None); padding already an
#: identity step.
GLAForm = tuple[Tensor, Tensor, Tensor, "Tensor | None", "Tensor | None"]


def identity_on_padding(valid: Tensor | None, *xs: Tensor) -> tuple[Tensor, ...]:
    """Zero ``xs`` (writes and log gates ``[B, T, H, *]``) where ``valid`` ``[B, T]`` is False."""
    if valid is None:
        return xs
    m = valid[:, :, None, None].to(xs[0].dtype)
    return tuple(x * m for x in xs)


def run_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None,
    gv: Tensor | None,
    state: Tensor | None,
    want_state: bool,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One GLA kernel call (scale 1): the token loop for one token per sequence (decoding), chunked otherwise.

    Args:
        q: ``[B, T, Hq, K]``; k, gk: ``[B, T, Hkv, K]``; v, gv: ``[B, T, Hkv, V]``.
        state: ``[N, Hkv, K, V]`` fp32 initial state (N = B, or segments with ``cu_seqlens``) or None.
        cu_seqlens: ``[N + 1]`` segment boundaries (B = 1), or None.

    Returns:
        ``o`` ``[B, T, Hq, V]`` and the final state ``[N, Hkv, K, V]`` (None unless ``want_state``).
    """
    fn = fused_recurrent_gla if q.shape[1] == 1 and cu_seqlens is None else chunk_gla
    return fn(q, k, v, gk=gk, gv=gv, scale=1.0, initial_state=state, output_final_state=want_state,
              cu_seqlens=cu_seqlens)  # fmt: skip


class RecurrentMixer(Mixer):
    """Project, run ``recur`` from the cached state, project out. Subclasses implement ``recur``.

    Builds ``g_proj`` (``[Hkv * D, C]``, the key's bias setting) when the options say ``gate: projection``.
    """

    class Options(Mixer.Options):
        gate: Literal["key", "projection"] = Field(
            "key",
            description="gate source: the mixer's key (Liger), or its own g_proj (see the pooled_key_gate weight map)",
        )

    def __init__(self, site: AttentionSite, options: Any, config: Any, *, projections: bool = True) -> None:
        super().__init__(site, options, config, projections=projections)
        d = site.dims
        # A registered attribute either way, so state dicts and weight maps see a stable structure.
        self.g_proj: nn.Linear | None = (
            nn.Linear(d.hidden_size, d.num_kv_heads * d.head_dim, bias=d.qkv_bias)
            if options.gate == "projection"
            else None
        )

    def gla_form(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, valid: Tensor | None) -> GLAForm | None:
        """The recurrence as the inputs of one GLA call, when it is one (gla, hgrn2); None otherwise (gsa, mom).

        A mixer that returns it gets ``recur`` for free, and a parent (Liger Attention) can fuse it with its window
        in one kernel on the GPU.
        """
        return None

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
        """The recurrence: pre-RoPE ``q`` ``[B, T, Hq, D]``, ``k``/``v``/``gate`` ``[B, T, Hkv, D]`` -> fp32 output.

        The default runs ``gla_form`` through the GLA kernels with one state ``[N, Hkv, K, V]``; mixers whose
        recurrence is not one GLA call override it.

        Args:
            valid: ``[B, T]`` bool (False: left padding) or None.
            state: the state tuple to start from (what this method returned before), or None for zeros.
            want_state: return the final state tuple (otherwise None).
            cu_seqlens: ``[N + 1]`` variable-length segments along T (B = 1): each segment runs from its own entry
                of ``state`` (stacked along dim 0) and gets its own final state.

        Returns:
            ``o`` ``[B, T, Hq, D]`` fp32, and the state tuple or None.
        """
        form = self.gla_form(q, k, v, gate, valid)
        if form is None:
            raise NotImplementedError(f"{type(self).__name__} implements neither gla_form nor recur")
        o, s = run_gla(*form, state[0] if state else None, want_state, cu_seqlens)
        return o, ((s,) if want_state else None)

    def gate_source(self, x: Tensor, k: Tensor) -> Tensor:
        """The gate input ``[B, T, Hkv, D]``: the key itself, or ``g_proj(x)``."""
        return k if self.g_proj is None else self.g_proj(x).view(k.shape)

    def recurrent_output(
        self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, state: State | None, want_state: bool
    ) -> tuple[Tensor, State | None]:
        """The recurrent output for projected ``q``/``k``/``v`` of ``x`` ``[B, T, C]``; what a parent mixer calls.

        Mixers with parameters of their own beyond the gate (routers, per-memory projections) override this.
        """
        return self.recur(q, k, v, self.gate_source(x, k), valid, state, want_state)

    def advance(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, state: State | None) -> State:
        """The state after ``x`` ``[B, T, C]`` without the output: for a parent that reads only the state (Liger
        Attention's retrieval memory with ``w_rec: 0``). A GLA form takes the state-only update (no query, no
        intra-chunk work); other recurrences run ``recurrent_output`` and drop the output."""
        if type(self).recurrent_output is RecurrentMixer.recurrent_output and type(self).recur is RecurrentMixer.recur:
            form = self.gla_form(q, k, v, self.gate_source(x, k), valid)
            if form is not None:
                _, fk, fv, gk, gv = form
                return (torch_gla_state(fk, fv, gk, gv, state[0] if state else None),)
        return self.recurrent_output(x, q, k, v, valid, state, True)[1]

    def mix(self, x: Tensor, ctx: MixContext) -> Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]``; continues and updates the layer's state in ``ctx.cache``."""
        B, T, _ = x.shape
        q, k, v = self.project(x)
        layer = mixer_cache(ctx.cache, self.layer_idx)
        if layer is None:  # training and uncached forwards: nothing to carry, the mixing may be recomputed
            valid = ctx.padding_mask
            o = self.recomputed(lambda *a: self.recurrent_output(*a, valid, None, False)[0], x, q, k, v)
        else:
            o, state = self.recurrent_output(x, q, k, v, ctx.padding_mask, layer.states, True)
            layer.commit(T, states=state)
        return self.output(o.reshape(B, T, -1).to(x.dtype), x)


class RecurrentBranch(Named):
    """A recurrent mixer nested in another mixer's options, the one spelling for it everywhere::

        recurrent: {mixer: hgrn2, options: {lower_bound: 0.1}}      # or ``recurrent: hgrn2`` for its defaults

    Liger Attention's recurrent branch and MoM's memories are one. The name is looked up among the registered
    recurrent mixers (built-ins and plugins'); ``cls`` is the class, ``options`` its validated ``Options``.
    """

    kind: ClassVar[str] = "recurrent mixer"

    mixer: str = Field("gla", description="a registered recurrent mixer: gla, hgrn2, gsa, mom, or a plugin's")

    @property
    def mixer_cls(self) -> type[RecurrentMixer]:
        return self.cls
