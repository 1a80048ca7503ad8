"""The two plugin contracts (``Mixer`` and ``WeightMap``) and the adapter to Hugging Face decoder layers.

A mixer replaces one attention module. It owns HF-named projections (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj``, and the model's ``q_norm``/``k_norm``/``v_norm`` when it has them), so LoRA targets and weight maps are
the same for every architecture; on a multi-head latent attention site it owns copies of the model's own low-rank
projections instead (``surgery.sites.latent``), and a mixer that keeps the layer's learned key selection owns a copy of its
DSA indexer (``Mixer.uses_key_selection``, ``surgery.sites.key_selection``). Subclasses implement ``mix``; ``forward``
absorbs the HF calling convention (keyword names that change between architectures and versions, positional
arguments bound by the replaced module's signature, a residual some layers expect attention to add) in this one
place and returns ``(output, None)`` (a third output where the pretrained module returns one).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from surgery.errors import InputError, MixerDimsError
from surgery.kernels import transient_saves
from surgery.options import Options  # re-exported: plugins import it from here
from surgery.sites.attention import AttentionSite
from surgery.sites.attention_extras import AttentionExtras
from surgery.sites.latent import latent_compress, latent_gate, latent_project
from surgery.sites.rotary import apply_rope, rotate_half

__all__ = ["MixContext", "Mixer", "Options", "SharedState", "WeightMap", "apply_rope", "rotate_half"]

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class SharedState:
    """Per-model values that the decoder layers do not pass to attention modules.

    Transformers replaces the user's 2D ``attention_mask`` by a 4D causal mask before the layers run, but
    recurrent mixers need the 2D padding mask (left-padded batches). A forward pre-hook on the model
    (``install_padding_hook``) stores it here; every mixer of the model holds a reference to one instance.
    """

    def __init__(self) -> None:
        self.padding_mask: Tensor | None = None  # [B, past + T], 1 = real token, as the user passed it


def install_padding_hook(model: nn.Module, shared: SharedState) -> None:
    """Record the 2D ``attention_mask`` of every call to ``model`` into ``shared`` (idempotent per model)."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
            mask = args[1]
        shared.padding_mask = mask if (mask is not None and mask.dim() == 2) else None
        refuse_packed_rows(kwargs.get("position_ids"), shared.padding_mask)

    handle = getattr(model, "_surgery_padding_hook", None)
    if handle is not None:
        handle.remove()
    model._surgery_padding_hook = model.register_forward_pre_hook(hook, with_kwargs=True)


def refuse_packed_rows(position_ids: Any, padding_mask: Tensor | None) -> None:
    """Raise ``InputError`` when ``position_ids`` ``[B, T]`` restart inside a row between two real tokens: rows
    packed with several sequences (as flash-attention collators pack them). A converted layer keeps a recurrent
    state, a window and a memory along the row, so it would carry one sequence into the next; the layers take one
    sequence per row, padded. Left padding (position ids of pad tokens are arbitrary) is not a restart."""
    if not isinstance(position_ids, Tensor) or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return
    T = position_ids.shape[1]
    back = position_ids[:, 1:] <= position_ids[:, :-1]
    if padding_mask is not None and padding_mask.shape[1] >= T:
        real = padding_mask[:, -T:].to(device=back.device, dtype=torch.bool)
        back = back & real[:, 1:] & real[:, :-1]
    if bool(back.any()):  # one host sync per forward of more than one token
        row, col = (int(i) for i in back.nonzero()[0])
        raise InputError(f"packed rows: position_ids restart inside row {row} at column {col + 1}; the converted "
                         f"layers keep a state, a window and a memory along each row and would carry one sequence "
                         f"into the next. Pass one sequence per row, padded, with an attention_mask")


@dataclass
class MixContext:
    """What a mixer may use besides the hidden states, gathered by ``Mixer.forward``.

    Attributes:
        position_embeddings: ``(cos, sin)`` ``[B, T, R]`` as the model computed them for this layer (R may be
            smaller than the head dim: partial rotary), or whatever else the model passes (Llama-4's complex
            ``freqs_cis``): only ``rotate`` interprets it.
        attention_mask: the mask the decoder layer passed (4D, a BlockMask, or None), for softmax attention.
        padding_mask: ``[B, T]`` bool, True for real tokens of this call; None when every token is real.
        cache: the HF ``Cache`` object of this forward, or None.
        attn_kwargs: remaining keyword arguments, forwarded to transformers' attention functions.
        rotate: the mixer's ``Mixer.rotate`` (q, k ``[B, T, H, D]`` -> rotated ``[B, H, T, D]``), for helpers that
            get the context but not the mixer (``surgery.window``); None: rotate-half.
        query_scale: ``[B, 1, T, 1]`` per-position factor on the post-RoPE queries that some decoder layers pass
            (Beam's scalable softmax on its NoPE layers, keyword ``attention_scaling``), or None.
        position_bias: an additive bias on the attention scores that the model passes instead of rotary
            embeddings (ALiBi), ``[H | B*H, 1 | T, S_max]``, its last ``S`` columns for ``S`` keys; None when absent.
            Softmax attention adds it; recurrent mixers run without positions.
        bias_in_product: the bias came as Bloom's ``alibi``, which the layer adds inside the score product
            (``baddbmm``) rather than after scaling (MPT's ``position_bias``); kept layers round as it does.
        previous_selection: the keys the previous layer's indexer selected, ``[B, T, k]`` indices, as the decoder
            layer passes them (``prev_topk_indices``, ``surgery.sites.key_selection``); None when it passes none.
        selection: the keys this layer selected, set by a mixer that runs the layer's key selection; the adapter
            returns it to the decoder layer (or ``previous_selection`` on a layer that reuses it).
    """

    position_embeddings: tuple[Tensor, Tensor] | None
    attention_mask: Any
    padding_mask: Tensor | None
    cache: Any
    attn_kwargs: dict[str, Any]
    rotate: Callable[[Tensor, Tensor, Any], tuple[Tensor, Tensor]] | None = None
    query_scale: Tensor | None = None
    position_bias: Tensor | None = None
    bias_in_product: bool = False
    previous_selection: Tensor | None = None
    selection: Tensor | None = None

    def scale_queries(self, q: Tensor) -> Tensor:
        """``q`` ``[B, Hq, T, D]`` (post-RoPE) times ``query_scale`` in fp32, as the pretrained layer does it."""
        return q if self.query_scale is None else (q.float() * self.query_scale).to(q.dtype)


class Mixer(nn.Module):
    """Base of every token mixer. ``x`` ``[B, T, C]`` -> ``[B, T, C]``.

    Class attributes a plugin sets: ``name`` (``^[a-z][a-z0-9_]*$``), ``description`` (one line),
    ``default_weights`` (the weight map a plan gets when it names none: every mixer names its own, the core names
    none), a nested ``Options`` model, and ``test_options``: option sets the generated conformance suite
    (``tests/test_conformance.py``) runs this mixer with, on tiny models (head dim 8 to 16, 2 to 4 heads).

    Args:
        site: the attention module this mixer replaces, read into one canonical description.
        options: this mixer's validated ``Options``.
        config: the model's config (transformers' attention functions read ``_attn_implementation``).
        projections: build the HF-named q/k/v/o projections (and the model's q/k norms). A mixer used as a branch
            of another (Liger Attention's recurrent branch) shares its parent's and builds none.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    default_weights: ClassVar[str]
    test_options: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    #: Whether the decode step (one token per sequence, over ``surgery.static_cache``) may be captured in a CUDA
    #: graph: no host synchronisation, no shapes that depend on data, every cache write through ``commit``.
    #: A mixer that cannot promise this sets False and decodes eagerly (``surgery.generate`` warns).
    capturable: ClassVar[bool] = True
    #: Whether this mixer runs a softmax that takes the pretrained layer's learned sink logits (``sink_logits``
    #: ``[Hq]``, see ``surgery.sites.attention_extras``). Others do not own them, and the manifest reports them dropped.
    uses_sink_logits: ClassVar[bool] = False
    #: Whether this mixer reproduces the pretrained layer's learned key selection (a DSA indexer: each query sees
    #: only the top-k keys it scores, ``surgery.sites.key_selection``). Such a mixer owns a copy of the indexer under its
    #: own name; others attend to every key by construction, and the manifest reports the indexer dropped.
    uses_key_selection: ClassVar[bool] = False
    #: Whether the layer stays softmax attention over a key/value cache that grows with the sequence (the
    #: identity mixer ``softmax``): the static cache holds such a layer as a kept one (keys and values up to
    #: ``max_length``), not as a constant-size mixer state.
    keeps_kv_cache: ClassVar[bool] = False
    #: A scalar a mixer may set during a training forward (e.g. a load-balancing loss); recovery adds it to the
    #: stage's loss and clears it.
    aux_loss: Tensor | None = None
    #: Recompute the token mixing (feature maps, gates, kernels) in the backward rather than keep its activations:
    #: None (the default) does so for CUDA tensors, True always, False never. It applies to a training forward that
    #: records gradients and has no cache; inference keeps its path. Recovery sets it from ``recompute_mixers``.
    recompute: bool | None = None

    class Options(Options):
        pass

    def stats(self) -> dict[str, Any]:
        """Counts this mixer kept since the last ``reset_stats`` (MoM: tokens per memory), or ``{}``.

        Values are numbers or lists of numbers that add up across processes. Recovery resets them when a stage
        starts and writes them, summed over processes, into the stage's result and the run's report.
        """
        return {}

    def reset_stats(self) -> None:
        """Start counting afresh (see ``stats``)."""

    def __init__(self, site: AttentionSite, options: Options, config: Any, *, projections: bool = True) -> None:
        super().__init__()
        d = site.dims
        self.site = site
        self.options = options
        self.config = config  # the model config: transformers' attention functions read _attn_implementation
        self.layer_idx = site.layer_idx
        self.head_dim = d.head_dim
        self.v_head_dim: int = d.v_head_dim  # type: ignore[assignment]  # filled in by AttentionDims
        self.num_heads = d.num_heads
        self.num_kv_heads = d.num_kv_heads
        self.num_key_value_groups = d.groups  # name read by transformers' attention functions
        self.scaling = d.scaling
        self.is_causal = True
        self.attention_dropout = 0.0
        self.shared: SharedState | None = None  # set by the converter
        if not projections:
            return
        if site.latent is not None:
            # The model's own low-rank sub-graph, under its own names (weight maps, LoRA, saved tensors).
            for name, module in site.modules.items():
                setattr(self, name, copy.deepcopy(module))
        else:
            self.q_proj = nn.Linear(d.hidden_size, d.num_heads * d.head_dim, bias=d.qkv_bias)
            self.k_proj = nn.Linear(d.hidden_size, d.num_kv_heads * d.head_dim, bias=d.qkv_bias)
            self.v_proj = nn.Linear(d.hidden_size, d.num_kv_heads * self.v_head_dim, bias=d.qkv_bias)
        self.o_proj = nn.Linear(d.num_heads * self.v_head_dim, d.hidden_size, bias=d.o_bias)
        self.q_norm = copy.deepcopy(site.q_norm) if site.q_norm is not None else None
        self.k_norm = copy.deepcopy(site.k_norm) if site.k_norm is not None else None
        self.v_norm = copy.deepcopy(site.v_norm) if site.v_norm is not None else None
        if site.extras is not None:
            self._build_extras(site.extras)
        selection = site.key_selection
        if selection is not None and selection.module is not None and self.uses_key_selection:
            setattr(self, selection.name, copy.deepcopy(selection.module))

    def _build_extras(self, extras: AttentionExtras) -> None:
        """The pretrained layer's sink logits, output gate, pre-output norm and output bias (canonical names)."""
        d = self.site.dims
        if extras.sink_logits and self.uses_sink_logits:
            self.sink_logits = nn.Parameter(torch.zeros(d.num_heads))  # [Hq]; read by softmax and window mixers
        gate = extras.gate
        if gate is not None:
            width = d.num_heads if gate.per_head else d.num_heads * self.v_head_dim
            self.out_gate = nn.Linear(d.hidden_size, width, bias=gate.bias)
            if gate.head_bias:
                self.out_gate_head_bias = nn.Parameter(torch.zeros(d.num_heads))
        if extras.o_norm is not None:
            self.o_norm = copy.deepcopy(extras.o_norm)
        if extras.o_bias:
            self.o_bias = nn.Parameter(torch.zeros(d.hidden_size))

    @classmethod
    def resolve_options(cls, site: AttentionSite, options: Options) -> Options:
        """The options for this site, with defaults that depend on its dimensions filled in.

        The converter records the result in the manifest, so a default chosen for a model is visible and saved.
        Default: ``options`` unchanged.
        """
        return options

    @classmethod
    def default_weights_for(cls, options: Options) -> str:
        """The weight map a plan rule with these options gets when it names none. Default: ``default_weights``."""
        return cls.default_weights

    @classmethod
    def check_site(cls, site: AttentionSite, options: Options) -> None:
        """Raise ``MixerDimsError`` when this mixer cannot replace ``site`` with (resolved) ``options``."""

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, options={self.options.model_dump()}"

    # -- helpers shared by mixers -------------------------------------------------------------------------

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q ``[B, T, Hq, D]``, k ``[B, T, Hkv, D]`` and v ``[B, T, Hkv, Dv]`` (``Dv = v_head_dim``, usually D),
        before RoPE, after the model's v norm and q/k/v clamp.

        After the model's q/k norms, unless the layer applies them after RoPE (``site.rotary.norms_after``):
        then ``rotate`` applies them, and recurrent branches see q and k unnormalised. A latent site expands its
        compressed latent into per-head q/k/v (``surgery.sites.latent``).
        """
        if self.site.latent is not None:
            parts, k, v = latent_project(self, x, self.site.latent, self.num_heads)
            self.keep_latent_gate(x, parts.gate)
            return parts.q, k, v
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.v_head_dim)
        if self.site.dims.value_scale != 1.0:
            v = v * self.site.dims.value_scale
        if self.v_norm is not None:
            v = self.v_norm(v)
        if not self.site.rotary.norms_after:
            if self.q_norm is not None:
                q = self.q_norm(q)
            if self.k_norm is not None:
                k = self.k_norm(k)
        clip = self.site.dims.qkv_clip
        if clip is not None:
            # After the norms, as OLMoE clamps; the other clamping families (DBRX, MPT, OLMo) have no q/k norms.
            q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
        return q, k, v

    def rotate(self, q: Tensor, k: Tensor, position_embeddings: Any) -> tuple[Tensor, Tensor]:
        """``project``'s q ``[B, T, Hq, D]`` and k ``[B, T, Hkv, D]`` -> ``[B, Hq, T, D]``, ``[B, Hkv, T, D]``.

        Rotated as the pretrained layer rotates them (``site.rotary``: its own function, or none on NoPE layers),
        then normalised when the layer norms after RoPE. Every mixer that uses positions rotates through here, so
        kept layers are exact and window branches see the pretrained positions.
        """
        rotary = self.site.rotary
        q, k = rotary.apply(q, k, position_embeddings)
        if rotary.norms_after:
            # Norms take [..., H, D] (whole-width ones flatten the last two axes), as project would give them.
            q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)  # branches own none
            if q_norm is not None:
                q = q_norm(q.transpose(1, 2)).transpose(1, 2)
            if k_norm is not None:
                k = k_norm(k.transpose(1, 2)).transpose(1, 2)
        return q, k

    def keep_latent_gate(self, x: Tensor, gate: Tensor | None) -> None:
        """Hold the output gate that a latent site's fused query projection gave for ``x`` (AXK2) until ``output``."""
        if gate is not None:
            self.__dict__["_kept_latent_gate"] = (x, gate)  # a plain attribute: no parameter, no buffer, not saved

    def _latent_gate(self, x: Tensor) -> Tensor:
        """The fused gate logits ``[B, T, Hq * Dv]`` of ``x``: the ones ``project`` kept, else computed again."""
        kept = self.__dict__.pop("_kept_latent_gate", None)
        if kept is not None and kept[0] is x:
            return kept[1]
        gate = latent_compress(self, x, self.site.latent, self.num_heads).gate  # type: ignore[arg-type]
        assert gate is not None
        return gate

    def output(self, o: Tensor, x: Tensor) -> Tensor:
        """The output projection of the attention output ``o`` ``[B, T, Hq * D]`` of layer input ``x`` ``[B, T, C]``.

        Every mixer ends with it: ``o_proj`` alone, or, where the pretrained layer has them, its output gate (from
        ``x``, or fused into a latent site's query projection), its norm before ``o_proj`` and its separate output
        bias, in the pretrained order.
        """
        latent = self.site.latent
        if latent is not None and latent.q_gate:
            o = latent_gate(o, self._latent_gate(x))
        extras = self.site.extras
        if extras is None or not extras.on_output:
            return self.o_proj(o)
        gate = extras.gate
        if gate is not None:
            g = self.out_gate(x)
            B, T, _ = o.shape
            if gate.head_bias:
                g = g.view(B, T, self.num_heads, -1) + self.out_gate_head_bias[:, None]
            # softplus in fp32 (Laguna), sigmoid in the input dtype (AFMoE, HRM, Beam), as the families do.
            g = torch.sigmoid(g) if gate.activation == "sigmoid" else F.softplus(g.float()).to(o.dtype)
            if gate.per_head:
                o = (o.view(B, T, self.num_heads, -1) * g.view(B, T, self.num_heads, 1)).view(B, T, -1)
            else:
                o = o * g.reshape(B, T, -1)
        if extras.o_norm is not None:
            o = self.o_norm(o)
        out = self.o_proj(o)
        return out + self.o_bias if extras.o_bias else out

    def recomputed(self, fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
        """``fn(*args)``, a tensor. In a training forward that records gradients (and ``recompute`` allows it), the
        activations inside ``fn`` are not kept but recomputed in the backward (``torch.utils.checkpoint``): only
        ``args`` are saved, e.g. q/k/v ``[B, T, H, D]`` where the kernels would keep fp32 feature maps, gates and
        both branches' inputs. The checkpoint restores the RNG and autocast state, so ``fn`` reruns identically.
        """
        on = self.recompute if self.recompute is not None else args[0].is_cuda
        if not (on and self.training and torch.is_grad_enabled()):
            return fn(*args)

        def run(*a: Tensor) -> Tensor:
            with transient_saves():  # what fn's kernels save lives until the backward that follows the recompute
                return fn(*a)

        return checkpoint(run, *args, use_reentrant=False)

    # -- the HF adapter ----------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: Tensor,
        *args: Any,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None] | tuple[Tensor, None, Tensor | None]:
        # Positional arguments mean what they meant to the replaced module (GPT-NeoX's mask, Bloom's residual).
        names = self.site.call_args or ("attention_mask",)
        for name, value in zip(names, args, strict=False):
            kwargs.setdefault(name, value)
        attention_mask = kwargs.pop("attention_mask", attention_mask)
        position_embeddings = kwargs.pop("position_embeddings", position_embeddings)
        # Bloom adds the residual inside attention: the layer passes it, and expects it back in the output.
        residual = kwargs.pop("residual", None)
        cache = None
        for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
            value = kwargs.pop(key, None)
            cache = cache if value is None else value
        for key in ("position_ids", "use_cache", "output_attentions", "cache_position", "head_mask"):
            kwargs.pop(key, None)
        T = hidden_states.shape[1]
        padding = None
        if self.shared is not None and self.shared.padding_mask is not None:
            pm = self.shared.padding_mask[:, -T:].to(device=hidden_states.device, dtype=torch.bool)
            padding = None if bool(pm.all()) else pm
        query_scale = kwargs.pop("attention_scaling", None)
        query_scale = query_scale if isinstance(query_scale, Tensor) else None
        alibi = kwargs.pop("alibi", None)
        position_bias = kwargs.pop("position_bias", alibi)
        previous_selection = kwargs.pop("prev_topk_indices", None)
        ctx = MixContext(
            position_embeddings, attention_mask, padding, cache, kwargs, rotate=self.rotate, query_scale=query_scale,
            position_bias=position_bias, bias_in_product=alibi is not None,
            previous_selection=previous_selection,
        )  # fmt: skip
        out = self.mix(hidden_states, ctx)
        out = out if residual is None else residual + out
        selection = self.site.key_selection
        if selection is not None and selection.passes_on:
            # The decoder layer hands the third output to the next layer as its previous selection: this layer's,
            # or on a layer that reuses one, the one it was given; None after a layer whose mixer selects none.
            return out, None, ctx.selection if not selection.shared else ctx.previous_selection
        if self.site.extras is not None and self.site.extras.returns_bias:
            # The pretrained module returned its output bias for the layer to add; ``output`` added it already.
            return out, None, None
        return out, None

    def mix(self, x: Tensor, ctx: MixContext) -> Tensor:
        """Mix tokens: ``x`` ``[B, T, C]`` -> ``[B, T, C]``. Subclasses implement this."""
        raise NotImplementedError


class WeightMap:
    """Base of every weight-mapping strategy: canonical pretrained tensors in, a partial state dict out.

    A map says what it needs of a mixer, never which mixers: ``needs`` maps the name of a submodule the mixer must
    own (anywhere in it, e.g. ``g_proj`` or ``recurrent.g_proj``) to a hint shown when it does not. The converter
    checks ``needs`` on the built mixer (``surgery check`` too, on the meta device), loads the returned tensors;
    keys the mixer lacks are an error, mixer parameters left unset are reported as created new, canonical tensors
    not returned are reported as dropped.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    needs: ClassVar[dict[str, str]] = {}

    class Options(Options):
        pass

    def __init__(self, options: Options | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def missing(cls, mixer: Mixer) -> list[str]:
        """The ``needs`` entries ``mixer`` lacks, each as ``"'name' (hint)"``; empty when the map fits."""
        have = {name.rsplit(".", 1)[-1] for name, _ in mixer.named_modules() if name}
        return [f"'{n}' ({hint})" if hint else f"'{n}'" for n, hint in cls.needs.items() if n not in have]

    def __call__(self, src: Mapping[str, Tensor], dst: Mixer) -> dict[str, Tensor]:
        raise NotImplementedError
