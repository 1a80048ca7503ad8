"""The ``liger_attention`` mixer: Liger Attention, sliding-window softmax plus any registered recurrent mixer.

Liger Attention mixes two branches that share the pretrained q, k, v (liger.md section 3)::

    y = o_proj( w_swa * SWA(q, k, v) + w_rec * REC(q, k, v) )

SWA is the pretrained softmax attention (RoPE, the layer's scale, GQA) where each query sees itself and the
``window`` previous tokens (Liger: 64, i.e. 65 keys). REC is any registered recurrent mixer (a subclass of
``surgery.recurrent.RecurrentMixer``: gla, hgrn2, gsa, mom, or a plugin's), looked up by name and built with its own
options but without projections of its own, on the pre-RoPE q and k. Liger fixes ``w_swa = w_rec = 0.5`` and
reports that the weights summing to 1 matters. The cache keeps the recurrent state and the last ``window``
post-RoPE keys/values, so decoding is exact (the official code kept no window and decoded with SWA(q_t) = v_t,
liger.md section 6).

Two ways to combine the branches (``combine``): ``fixed`` weights as above (Liger), or ``shared``: one normalizer
over both (LoLCATs, LoLA), where the recurrent branch is one more term of the softmax::

    y = (sum_i exp(s_i) v_i + g phi(q)^T S) / (sum_i exp(s_i) + g phi(q)^T z),    g = exp(null_bias[head])

over the softmax's keys i (window, sinks, memory), with ``S`` the recurrent state and ``z`` its normalizer state (the
same recurrence over a column of ones). It runs as one softmax with a marker key per query whose logit is
``log(g phi(q)^T z)`` (``surgery.window.null_column``). ``null_bias`` is a trained parameter per query head,
initialised to ``shared_bias``: at a low value the conversion is the softmax side alone, and recovery learns how
much the recurrent state should add.

Plans name the branch as ``recurrent: {mixer: hgrn2, options: {lower_bound: 0.1}}`` (``recurrent: hgrn2`` for its
default options), the one spelling of a nested mixer (``surgery.recurrent.RecurrentBranch``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, model_validator
from torch import Tensor, nn

from surgery.cache import mixer_cache
from surgery.hookspecs import hookimpl
from surgery.mixer import MixContext, Mixer, MixerDimsError, Options, apply_rope
from surgery.options import did_you_mean, fail, lookup, problem
from surgery import retrieval_batched
from surgery.kernels.gla.states import gla_states_at
from surgery.recurrent import RecurrentBranch
from surgery.retrieval import decode_position, decodes_on_device, memory_branch, memory_decode_step
from surgery.sites.attention import AttentionSite
from surgery.window import rope, swa_branch, update_sinks

#: Decode steps over a static cache on CUDA take the fused window kernel (``LigerAttention._decode_step``); tests
#: switch it off to compare with the two-branch path.
FUSED_DECODE = True


class LigerAttention(Mixer):
    """``w_swa * SWA + w_rec * REC`` on shared projections; cache: the branch's state(s) + a key/value window."""

    name = "liger_attention"
    description = "Liger Attention: 0.5 sliding-window softmax attention (64 tokens) + 0.5 of a recurrent mixer."
    default_weights = "copy_qkvo"
    uses_sink_logits = True
    test_options = (
        {"window": 4},
        {"window": 4, "recurrent": "hgrn2"},
        {"window": 4, "recurrent": {"mixer": "gsa", "options": {"num_slots": 4}}},
        {"window": 4, "recurrent": {"mixer": "gla", "options": {"gate": "projection"}}, "w_swa": 0.3, "w_rec": 0.9},
        {"window": 4, "sinks": 2},
        {"window": 2, "sinks": 3, "window_dropout": 0.5},
        {"window": 2, "memory": 3, "memory_chunk": 2},
        {"window": 3, "memory": 2, "memory_chunk": 3, "sinks": 2},
        {"window": 3, "combine": "shared", "shared_bias": 0.0},
        {"window": 2, "memory": 3, "memory_chunk": 2, "sinks": 1, "combine": "shared", "shared_bias": 1.0},
    )

    class Options(Mixer.Options):
        recurrent: RecurrentBranch = Field("gla", validate_default=True, description="the recurrent branch")
        window: int = Field(64, ge=0, description="previous tokens each query sees in the softmax branch")
        sinks: int = Field(0, ge=0, description="first real tokens of each sequence the softmax branch always sees")
        memory: int = Field(
            0, ge=0,
            description="retrieval memory: past key/value pairs the recurrent state recalls worst, kept and attended "
                        "next to the window (LoLA-like; gla branch only; surgery.retrieval)")
        memory_chunk: int = Field(64, ge=1, description="tokens per memory consolidation (memory > 0)")
        window_dropout: float = Field(
            0.0, ge=0, le=1,
            description="training only: probability of dropping the window branch for a sequence (its weight goes "
                        "to the recurrent branch), so the recurrence learns to carry context (arXiv 2510.05901)")
        w_swa: float = Field(0.5, ge=0, description="weight of the sliding-window branch (combine: fixed)")
        w_rec: float = Field(0.5, ge=0, description="weight of the recurrent branch (combine: fixed)")
        combine: Literal["fixed", "shared"] = Field(
            "fixed", description="fixed: w_swa * softmax + w_rec * recurrent (Liger); shared: one normalizer over "
                                 "the softmax's keys and the recurrent state (LoLCATs, LoLA)")
        shared_bias: float = Field(
            -8.0, ge=-30, le=30,
            description="combine: shared: initial log-gain of the recurrent term per query head (trained; low: "
                        "the softmax side alone)")

        @model_validator(mode="before")
        @classmethod
        def _branch_keys(cls, data: Any, info: ValidationInfo) -> Any:
            """A branch's option beside Liger's own (the old short form) is an error that says where it goes."""
            if isinstance(data, dict):
                branch = data.get("recurrent", "gla")
                name = branch.get("mixer", "gla") if isinstance(branch, dict) else branch
                try:
                    theirs = set(lookup("recurrent mixer", name, info).Options.model_fields)
                except ValueError:  # an unknown branch is reported at recurrent.mixer
                    theirs = set()
                loose = [k for k in data if k not in cls.model_fields
                         and (k in theirs or not did_you_mean(str(k), cls.model_fields))]  # fmt: skip
                if loose:
                    fail([problem((k,), f"unknown key '{k}': an option of the recurrent branch goes under recurrent: "
                                        f"{{mixer: NAME, options: {{{k}: ...}}}}", data[k]) for k in loose],
                         cls.__qualname__)  # fmt: skip
            return data

        @model_validator(mode="after")
        def _combine(self) -> Any:
            # By value, not by the fields set: a saved plan spells out every default.
            fields = type(self).model_fields
            if self.combine == "shared":
                fixed = [n for n in ("w_swa", "w_rec", "window_dropout") if getattr(self, n) != fields[n].default]
                if fixed:
                    raise ValueError(f"{', '.join(fixed)} belong to combine: fixed; combine: shared weighs the "
                                     f"branches by one normalizer (its knob is shared_bias)")
            elif self.shared_bias != fields["shared_bias"].default:
                raise ValueError("shared_bias belongs to combine: shared")
            return self

        @model_validator(mode="after")
        def _memory_branch(self) -> Any:
            if self.memory > 0 and self.recurrent.mixer != "gla":
                raise ValueError(f"memory: {self.memory} needs recurrent: gla (it scores pairs with GLA's key "
                                 f"features); got recurrent: {self.recurrent.mixer}")
            return self

    def __init__(self, site: AttentionSite, options: Options, config: Any, *, projections: bool = True) -> None:
        super().__init__(site, options, config, projections=projections)
        branch = options.recurrent
        self.recurrent = branch.mixer_cls(site, branch.options, config, projections=False)
        if options.combine == "shared":  # [Hq] log-gain of the recurrent term (module docstring)
            self.null_bias = nn.Parameter(torch.full((site.dims.num_heads,), options.shared_bias))

    @classmethod
    def resolve_options(cls, site: AttentionSite, options: Options) -> Options:
        branch = options.recurrent
        resolved = branch.mixer_cls.resolve_options(site, branch.options)
        if resolved is branch.options:
            return options
        return options.model_copy(update={"recurrent": branch.with_options(resolved)})

    @classmethod
    def check_site(cls, site: AttentionSite, options: Options) -> None:
        if options.memory > 0 and site.extras is not None and site.extras.sink_logits:
            raise MixerDimsError("memory > 0 with learned sink logits: the retrieval memory's softmax has no sink")
        if options.combine == "shared" and site.extras is not None and site.extras.sink_logits:
            raise MixerDimsError("combine: shared with learned sink logits is not supported")
        if options.combine == "shared" and site.dims.softcap is not None:
            raise MixerDimsError(f"combine: shared with soft-capped logits (softcap {site.dims.softcap}) is not "
                                 "supported: the shared normalizer adds an uncapped term")
        options.recurrent.mixer_cls.check_site(site, options.recurrent.options)

    @classmethod
    def default_weights_for(cls, options: Options) -> str:
        """The branch's default map when it has parameters of its own to map (mom), else ``copy_qkvo``."""
        return options.recurrent.mixer_cls.default_weights_for(options.recurrent.options)

    def mix(self, x: Tensor, ctx: MixContext) -> Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]``; continues the cached state and window."""
        B, T, _ = x.shape
        opts = self.options
        q, k, v = self.project(x)
        if opts.memory > 0:
            return self._mix_with_memory(x, q, k, v, ctx)
        layer = mixer_cache(ctx.cache, self.layer_idx, window=opts.window)
        fused = self._fused(x, q, k, v, ctx, layer)
        if fused is not None:
            return fused
        if T == 1 and layer is not None:
            step = self._decode_step(x, q, k, v, ctx, layer)
            if step is not None:
                return step
        if layer is None:  # training and uncached forwards: the mixing may be recomputed in the backward
            o = self.recomputed(lambda *a: self._branches(*a, ctx, None), x, q, k, v)
        else:
            o = self._branches(x, q, k, v, ctx, layer)
        return self.output(o.reshape(B, T, -1).to(x.dtype), x)

    def _branches(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: MixContext, layer: Any) -> Tensor:
        """Both branches in PyTorch and their mix ``[B, T, Hq, Dv]`` fp32, the cache (if any) continued."""
        B, opts = x.shape[0], self.options
        state = layer.states if layer is not None else None
        shared = opts.combine == "shared"
        vr = _with_ones(v) if shared else v
        rec, state = self.recurrent.recurrent_output(x, q, k, vr, ctx.padding_mask, state, layer is not None)
        swa, (kw, vw, valid), aux = swa_branch(q, k, v, ctx, layer, opts.window, self.scaling,
                                               self.site.dims.softcap, sinks=opts.sinks,
                                               sink_logits=getattr(self, "sink_logits", None),
                                               null_logits=self._null_logits(rec) if shared else None)
        if layer is not None:
            layer.commit(x.shape[1], states=state, keys=kw, values=vw, valid=valid, aux=aux)
        if shared:
            return _shared(swa.float(), rec)
        if self.training and opts.window_dropout > 0:
            drop = (torch.rand(B, 1, 1, 1, device=x.device) < opts.window_dropout).float()
            return (1 - drop) * (opts.w_swa * swa.float() + opts.w_rec * rec) + drop * (opts.w_swa + opts.w_rec) * rec
        return opts.w_swa * swa.float() + opts.w_rec * rec

    def _fused(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: MixContext, layer: Any) -> Tensor | None:
        """Both branches in one op (``surgery.kernels.liger``: Triton on CUDA) when the call allows it, else None.

        It allows it on CUDA for a branch that is one GLA call with key-side gates (``gla_form``: gla, hgrn2, a
        plugin's), without padding, sinks or window dropout, and without a cache: training (recovery turns the
        cache off) and uncached forwards. A prefill into a cache takes the two-branch path, which also writes the
        window's keys and values and the recurrent state into the cache (the GPU test checks that decoding after it
        continues the fused full forward).
        """
        opts = self.options
        if not x.is_cuda or x.shape[1] == 1 or ctx.padding_mask is not None or opts.sinks > 0 or layer is not None:
            return None
        if opts.combine != "fixed":
            return None
        if ctx.query_scale is not None or getattr(self, "sink_logits", None) is not None:
            return None  # the fused kernel has neither a query scale nor sink logits
        if self.training and opts.window_dropout > 0:
            return None
        rec = self.recurrent
        # Whether the branch is one GLA call with key-side gates only, asked on an empty slice (no work).
        empty = rec.gla_form(q[:, :0], k[:, :0], v[:, :0], rec.gate_source(x[:, :0], k[:, :0]), None)
        if empty is None or empty[4] is not None:
            return None
        from surgery.kernels.liger import liger_attention

        def mixed(x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            fq, fk, _, gk, _ = rec.gla_form(q, k, v, rec.gate_source(x, k), None)
            qr, kr = self._rope_time_major(q, k, ctx)
            return liger_attention(qr, kr, fq, fk, v, gk, window=opts.window, scale=self.scaling,
                                   softcap=self.site.dims.softcap, w_swa=opts.w_swa, w_rec=opts.w_rec)[0]

        B, T, _ = x.shape
        o = self.recomputed(mixed, x, q, k, v)  # training keeps q/k/v only, not the feature maps and both branches
        return self.output(o.reshape(B, T, -1).to(x.dtype), x)

    def _whole_head_rotate_half(self, pe: Any, head_dim: int) -> bool:
        """Whether this layer rotates rotate-half over the whole head, before any q/k norm, with ``(cos, sin)``
        ``[B or 1, T, D]``: then the fused paths rotate in their own layout (or inside the decode kernel)."""
        rotary = self.site.rotary
        return (rotary.convention == "rotate_half" and not rotary.norms_after and isinstance(pe, tuple)
                and pe[0].dim() == 3 and pe[0].shape[-1] == head_dim)  # fmt: skip

    def _rope_time_major(self, q: Tensor, k: Tensor, ctx: MixContext) -> tuple[Tensor, Tensor]:
        """q ``[B, T, Hq, D]`` and k ``[B, T, Hkv, D]`` rotated, in that layout (what the kernels read).

        Rotate-half over the whole head is applied in place of layout, with the arithmetic of ``apply_rope``: on
        contiguous rows it is a vectorised pass, where rotating the ``[B, H, T, D]`` view and copying it back is a
        strided one and a copy more (5% of a training step at 16K tokens on an H200).
        """
        pe = ctx.position_embeddings
        if self._whole_head_rotate_half(pe, q.shape[-1]):
            return apply_rope(q, *pe, heads_dim=2), apply_rope(k, *pe, heads_dim=2)
        qr, kr = rope(q, k, ctx)  # [B, H, T, D]
        return qr.transpose(1, 2), kr.transpose(1, 2)

    def _decode_step(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: MixContext, layer: Any) -> Tensor | None:
        """One token per row over a static cache on CUDA: the window branch, its RoPE, the window update and the mix
        in one launch (``surgery.kernels.liger.decode``), else None (the two-branch path).

        ``x`` ``[B, 1, C]``; ``q`` ``[B, 1, Hq, D]``, ``k`` ``[B, 1, Hkv, D]``, ``v`` ``[B, 1, Hkv, Dv]`` (pre-RoPE). It
        runs without sinks, soft-capping, sink logits or a query scale, on a full static window (``static``), so the
        captured decode step of ``surgery.generate`` takes it; RoPE is fused when the layer rotates rotate-half over
        the whole head, else the layer's own rotation runs first.
        """
        opts = self.options
        if not (FUSED_DECODE and x.is_cuda and layer.static) or self.training or opts.sinks > 0 or opts.window == 0:
            return None
        if opts.combine != "fixed":
            return None
        if layer.keys is None or layer.keys.shape[2] != opts.window or layer.states is None:
            return None
        if ctx.query_scale is not None or self.site.dims.softcap is not None:
            return None
        if getattr(self, "sink_logits", None) is not None:
            return None
        from surgery.kernels.liger.decode import window_decode

        B = x.shape[0]
        rec, state = self.recurrent.recurrent_output(x, q, k, v, ctx.padding_mask, layer.states, True)
        pe = ctx.position_embeddings
        cos = sin = None
        if self._whole_head_rotate_half(pe, q.shape[-1]):
            D = q.shape[-1]  # cos/sin [B or 1, T, D]: this step's row of each
            qh, kh, cos, sin = q[:, 0], k[:, 0], pe[0][:, -1].expand(B, D), pe[1][:, -1].expand(B, D)
        else:
            qr, kr = rope(q, k, ctx)  # [B, H, 1, D]
            qh, kh = qr[:, :, 0], kr[:, :, 0]
        o = window_decode(qh, kh, v[:, 0], rec[:, 0], layer.keys, layer.values, layer.valid, self.scaling,
                          opts.w_swa, opts.w_rec, cos, sin)  # fmt: skip
        pad = ctx.padding_mask
        real = pad[:, -1:].to(torch.bool) if pad is not None else torch.ones_like(layer.valid[:, :1])
        layer.valid.copy_(torch.cat([layer.valid[:, 1:], real], 1))
        layer.commit(1, states=state)
        return self.output(o.reshape(B, 1, -1).to(x.dtype), x)

    def _null_logits(self, rec: Tensor) -> Tensor:
        """``rec`` ``[B, T, Hq, Dv + 1]`` -> the marker key's logits ``[B, Hq, T]``: ``log(g phi(q)^T z)``."""
        den = rec[..., -1].float().clamp_min(1e-30).log()  # [B, T, Hq]
        return (den + self.null_bias.float()).transpose(1, 2)

    def _mix_with_memory(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: MixContext) -> Tensor:
        """``mix`` with the retrieval memory: the recurrence runs span by span between consolidations."""
        B, T, _ = x.shape
        opts = self.options
        layer = mixer_cache(ctx.cache, self.layer_idx, window=opts.window + opts.memory_chunk)
        state = layer.states if layer is not None else None
        qr, kr = rope(q, k, ctx)
        qr = ctx.scale_queries(qr)
        vt = v.transpose(1, 2)
        fk = k.float().softmax(-1).transpose(1, 2)  # GLA's key features, what its state is read with
        valid = ctx.padding_mask
        on_device = decodes_on_device(layer, T, valid)  # one token per row over a static cache: no host sync
        sinks = None
        if opts.sinks > 0:
            seen = (decode_position(layer) if on_device else layer.seen) if layer is not None else 0
            sinks = update_sinks(layer.aux if layer is not None else None, kr, vt, valid, seen, opts.sinks)

        shared = opts.combine == "shared"
        vr = _with_ones(v) if shared else v

        def recur(lo: int, hi: int, st: Any) -> tuple[Tensor | None, Any]:
            sub = None if valid is None else valid[:, lo:hi]
            span = (x[:, lo:hi], q[:, lo:hi], k[:, lo:hi], vr[:, lo:hi], sub, st)
            if opts.w_rec == 0 and not shared:  # the state only chooses what to remember: its output would be x 0
                return None, self.recurrent.advance(*span)
            return self.recurrent.recurrent_output(*span, True)

        null = self._null_logits if shared else None
        if not on_device and retrieval_batched.applies(layer, valid, self.site.dims.softcap, null):
            def states_at(first: int, step: int, count: int) -> Tensor:
                _, fk_, fv, gk, gv = self.recurrent.gla_form(q, k, v, self.recurrent.gate_source(x, k), None)
                return gla_states_at(fk_, fv, gk, gv, first, step, count)

            swa, rec, state, (kw, vw, vb), aux = retrieval_batched.memory_batched(
                qr, kr, vt, fk, layer, opts.window, opts.memory_chunk, opts.memory, self.scaling, sinks, states_at,
                recur, output_used=opts.w_rec != 0 or shared)  # fmt: skip
        else:
            branch = memory_decode_step if on_device else memory_branch
            swa, rec, state, (kw, vw, vb), aux = branch(
                qr, kr, vt, fk, valid, layer, opts.window, opts.memory_chunk, opts.memory, self.scaling,
                self.site.dims.softcap, sinks, state, recur, null)  # fmt: skip
        if layer is not None:
            layer.commit(T, states=state, keys=kw, values=vw, valid=vb, aux=aux | (sinks or {}))
        if shared:
            o = _shared(swa.transpose(1, 2), rec)
        else:
            o = opts.w_swa * swa.transpose(1, 2) + (opts.w_rec * rec if rec is not None else 0)
        return self.output(o.reshape(B, T, -1).to(x.dtype), x)


def _with_ones(v: Tensor) -> Tensor:
    """``v`` ``[B, T, H, Dv]`` with a last column of ones: the recurrence then also carries its normalizer state."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _shared(soft: Tensor, rec: Tensor) -> Tensor:
    """One normalizer over both branches: ``soft`` ``[B, T, Hq, Dv + 1]`` (the softmax with the marker key, whose
    weight is the last column) and ``rec`` ``[B, T, Hq, Dv + 1]`` (``phi(q)^T S`` and ``phi(q)^T z``) ->
    ``[B, T, Hq, Dv]`` fp32: the softmax's keys over the shared denominator plus the marker's weight times the
    recurrent branch's own normalized output ``phi(q)^T S / phi(q)^T z``."""
    rec = rec.float()
    return soft[..., :-1].float() + soft[..., -1:].float() * rec[..., :-1] / rec[..., -1:].clamp_min(1e-30)


@hookimpl
def surgery_mixers() -> list[type[Mixer]]:
    return [LigerAttention]
