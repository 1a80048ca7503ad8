"""Read any Hugging Face attention module into one canonical description.

The converter never looks at architecture-specific classes: it asks this module for every self-attention
``AttentionSite`` of a causal LM, and for the site's pretrained tensors under canonical names. Two layouts are
understood: separate q/k/v projections (Llama, Mistral, Qwen2/3, Gemma3, OPT, Phi, ...; Gemma-4's global layers
take their values from the key projection) and fused ones (Phi-3's ``qkv_proj``, GPT-2's ``c_attn``, MPT's
``Wqkv``, and ``query_key_value`` grouped per key/value head: GPT-NeoX per head, Falcon per group), each as
``nn.Linear`` or transformers' transposed ``Conv1D``, with the output projection under any of its usual names.
CodeGen's ``qkv_proj``, interleaved over the model-parallel shards it was trained with (``mp_num``), is split too.
Multi-head latent attention (DeepSeek-V2/V3 style, ``surgery.sites.latent``) is read as its own layout: q/k/v come from
the model's own low-rank projection sub-graph; a DSA indexer that selects the keys each query sees is read with it
(``surgery.sites.key_selection``).

Besides the tensors, a site records what the layer does with them that mixers must repeat: its scale, window,
soft-cap, q/k/v clamp, q/k/v norms, how it applies RoPE (``surgery.sites.rotary``; none on NoPE layers), its extras
(``surgery.sites.attention_extras``), and whether it applies its window itself rather than through the model's mask
(GPT-Neo). Families state these through attributes of the module or its config, or in its ``forward``, read here
by name; none is keyed on a model type. Anything else fails loudly with the module class in the message.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from surgery.errors import AttentionReadError
from surgery.sites.attention_extras import EXTRA_CANONICAL, AttentionExtras, extra_weights, read_extras
from surgery.sites.key_selection import KeySelection, key_selection_weights, read_key_selection
from surgery.sites.latent import LatentQKV, is_latent, latent_rotary, latent_weights, read_latent
from surgery.sites.rotary import ROTATE_HALF, Rotary, RotaryReadError, read_rotary

Layout = Literal["separate", "fused_qkv", "fused_qkv_headwise", "fused_qkv_sharded", "latent"]

#: Canonical tensor names. They are also the parameter names of every built-in mixer, so that a weight map
#: that copies is a dictionary lookup and LoRA targets (q_proj, k_proj, v_proj, o_proj) are the same everywhere.
CANONICAL = (
    "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
    "o_proj.weight", "o_proj.bias", "q_norm.weight", "k_norm.weight", "v_norm.weight", *EXTRA_CANONICAL,
)  # fmt: skip


@dataclass(frozen=True)
class AttentionDims:
    """Shapes and settings of one attention layer (no tensors; valid on the meta device)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    scaling: float  # the softmax scale the pretrained layer uses (1/sqrt(head_dim) unless the model says otherwise)
    sliding_window: int | None = None  # this layer's own window, None for global attention
    softcap: float | None = None  # attention-logit soft-capping (Gemma 2 style), None when absent
    v_head_dim: int | None = None  # value (and output) head dim; None: head_dim (MLA and MiMo differ)
    value_scale: float = 1.0  # multiplies the values (MiMo-V2's attention_value_scale)
    qkv_clip: float | None = None  # q, k and v clamped to [-clip, clip] (DBRX, MPT, OLMo), None when absent
    window_in_mask: bool = True  # False when the model's masks are plain causal and the layer applies its window

    def __post_init__(self) -> None:
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention module of a model, read without touching its weights.

    ``q_norm``/``k_norm`` are the model's own per-head norm modules (Qwen3, Gemma3), applied to q and k before RoPE
    unless ``rotary.norms_after``, ``v_norm`` the one on v (Gemma-3n and Gemma-4, often without a weight); mixers
    deep-copy them so that the exact normalisation (eps, ``1 + w`` offsets) is kept. ``rotary`` says how the layer
    applies RoPE (``surgery.sites.rotary``: its own function, none at all, or only on a latent site's trailing dims). A
    ``latent`` site (multi-head latent attention, ``surgery.sites.latent``) has no q/k/v projections: ``modules`` holds the
    model's own projection sub-graph by child name, which mixers deep-copy under the same names.

    Construct it with keywords past ``layout``: fields are added over time.
    """

    layer_idx: int
    path: str  # module path inside the model, e.g. "model.layers.3.self_attn"
    module_class: str
    dims: AttentionDims
    layout: Layout
    q_norm: nn.Module | None = field(default=None, compare=False, repr=False)
    k_norm: nn.Module | None = field(default=None, compare=False, repr=False)
    v_norm: nn.Module | None = field(default=None, compare=False, repr=False)
    qkv_names: tuple[str, ...] = ()  # the module's own projection child names, e.g. ("c_attn",)
    out_name: str = ""  # the module's own output projection name, e.g. "dense"
    rotary: Rotary = ROTATE_HALF
    #: Sink logits, an output gate, a pre-output norm or a separate output bias (``surgery.sites.attention_extras``).
    extras: AttentionExtras | None = field(default=None, compare=False, repr=False)
    latent: LatentQKV | None = None  # how q/k/v come from the latent sub-graph; None for q/k/v projections
    modules: dict[str, nn.Module] = field(default_factory=dict, compare=False, repr=False)
    #: A learned top-k key selection (DSA indexer, ``surgery.sites.key_selection``), or None: every key is seen.
    key_selection: KeySelection | None = None
    #: The names of the module's ``forward`` parameters after the hidden states, in order, so that the mixer
    #: standing in for it binds positional arguments the way it did (GPT-NeoX's mask, Bloom's residual).
    call_args: tuple[str, ...] = ()


#: Projection children of each layout: (q/k/v projection names, output projection names). A module owning one set
#: of q/k/v names and one output name is read; any other attention-looking module is an error rather than a guess.
_OUT = ("o_proj", "out_proj", "dense", "c_proj", "Wo")
_LAYOUTS: dict[Layout, tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]] = {
    "separate": ((("q_proj", "k_proj", "v_proj"),), _OUT),
    "fused_qkv": ((("qkv_proj",), ("c_attn",), ("Wqkv",)), _OUT),  # rows [q | k | v]
    "fused_qkv_headwise": ((("query_key_value",),), _OUT),  # rows [q.. | k | v] per key/value head
}

#: Child names that betray an attention module whatever its class is called (GPT-2's ``c_attn``, MPT's ``Wqkv``...).
_QKV_HINTS = frozenset(
    {"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "wqkv", "qkv", "in_proj",
     "query", "key", "value", "wq", "wk", "wv", "q_a_proj", "kv_a_proj_with_mqa"}
)  # fmt: skip

#: Children an attention module may own besides its projections: q/k norms, under their canonical name and the
#: names families give them. Parameter-free children (rotary embeddings, dropouts) are ignored; any other child
#: with parameters would be lost, so it is an error.
_NORMS = ("q_norm", "k_norm", "v_norm")
#: Llama-4's parameter-free ``qk_norm`` serves both q and k.
_NORM_ALIASES = {
    "q_norm": ("q_norm", "q_layernorm", "query_layernorm", "qk_norm"),
    "k_norm": ("k_norm", "k_layernorm", "key_layernorm", "qk_norm"),
    "v_norm": ("v_norm",),
}


def _error(path: str, module: nn.Module, why: str) -> AttentionReadError:
    return AttentionReadError(f"attention module {path!r} ({type(module).__name__}): {why}")


def _looks_like_attention(module: nn.Module) -> bool:
    children = dict(module.named_children())
    if _QKV_HINTS.intersection(children):
        return True
    # Norm classes named after attention ("PostAttentionNorm") own no Linear, so they do not match.
    named_attention = "attention" in type(module).__name__.lower()
    return named_attention and any(isinstance(c, nn.Linear) for c in children.values())


def _attention_in(layer: nn.Module, layer_path: str) -> list[tuple[str, nn.Module]]:
    """The outermost attention-looking modules inside ``layer`` (a module found inside another is not counted)."""
    found: list[tuple[str, nn.Module]] = []
    for name, sub in layer.named_modules():
        if sub is layer or any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if _looks_like_attention(sub):
            found.append((name, sub))
    return [(f"{layer_path}.{name}", sub) for name, sub in found]


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The outermost ModuleList whose elements hold attention, searched in the decoder when the model has one."""
    scopes = [model]
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, ValueError, NotImplementedError):
            decoder = None
        if isinstance(decoder, nn.Module):
            # Searched first; ModernBERT-decoder's "decoder" is its LM head, so the whole model comes after it.
            scopes.insert(0, decoder)
    names = {id(m): n for n, m in model.named_modules()}
    for scope in scopes:
        for sub in scope.modules():
            if isinstance(sub, nn.ModuleList) and any(_attention_in(layer, "") for layer in sub):
                return names[id(sub)], sub
    raise AttentionReadError(
        f"{type(model).__name__}: no decoder layers found (no ModuleList whose layers hold an attention module "
        "with q/k/v projections)"
    )


class _Proj:
    """A projection read as ``nn.Linear`` would hold it: ``weight`` [out, in] (Conv1D's [in, out] transposed)."""

    def __init__(self, path: str, module: nn.Module, name: str) -> None:
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear):
            self.weight, self.bias = child.weight, child.bias
        elif isinstance(child, Conv1D):  # GPT-2 family: y = x @ W + b with W [in, out]
            self.weight, self.bias = child.weight.t(), child.bias
        else:
            raise _error(path, module, f"{name!r} is {type(child).__name__}, expected torch.nn.Linear or Conv1D")
        self.out_features, self.in_features = self.weight.shape


def _layout_of(path: str, module: nn.Module) -> tuple[Layout, tuple[str, ...], str]:
    children = dict(module.named_children())
    if getattr(module, "is_kv_shared_layer", False):
        raise _error(path, module, "the layer reuses the keys and values of an earlier layer (KV sharing), so it has "
                     "no key/value projections of its own to convert")  # fmt: skip
    for layout, (qkv_sets, outs) in _LAYOUTS.items():
        out = next((o for o in outs if o in children), None)
        for qkv in qkv_sets:
            if out is not None and all(name in children for name in qkv):
                return layout, qkv, out
    out = next((o for o in _OUT if o in children), None)
    if out is not None and "q_proj" in children and "k_proj" in children and _values_are_keys(module):
        return "separate", ("q_proj", "k_proj"), out  # v_proj is k_proj (see _values_are_keys)
    known = "; ".join(f"{' or '.join('/'.join(q) for q in qkv)}" for qkv, _ in _LAYOUTS.values())
    raise _error(
        path, module, f"unknown projection layout (children: {', '.join(children)}); readable: {known}, "
        f"with an output projection named {'/'.join(_OUT)}"
    )  # fmt: skip


def _values_are_keys(module: nn.Module) -> bool:
    """Whether the module declares ``v_proj = None`` and takes its values from the key projection (Gemma-4's
    ``attention_k_eq_v`` global layers: v is k_proj's output before the key norm)."""
    return hasattr(module, "v_proj") and module.v_proj is None


def _check_children(
    path: str, module: nn.Module, qkv: tuple[str, ...], out: str, extras: set[str] | frozenset[str] = frozenset()
) -> None:
    """Refuse modules that own parameters we would silently drop; ``extras``: names ``read_extras`` understood."""
    own = [name for name, _ in module.named_parameters(recurse=False) if name not in extras]
    if own:
        raise _error(path, module, f"owns parameters outside its projections: {', '.join(own)}")
    allowed = {*qkv, out, *extras, *(n for names in _NORM_ALIASES.values() for n in names)}
    for name, child in module.named_children():
        if name not in allowed and any(True for _ in child.parameters()):
            raise _error(path, module, f"child {name!r} ({type(child).__name__}) has parameters that cannot be read")


def _head_dim(module: nn.Module, cfg: Any) -> int | None:
    for owner, attr in ((module, "head_dim"), (module, "head_size"), (cfg, "head_dim")):
        value = getattr(owner, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None


def _masks_itself(module: nn.Module) -> bool:
    """GPT-Neo's convention: the layer keeps its own boolean causal buffer ``bias`` [1, 1, N, N], with its local
    window cut into it (``attention_type`` "local", ``config.window_size``); the model's mask is plain causal."""
    own = getattr(module, "bias", None)
    return isinstance(own, Tensor) and own.dtype == torch.bool and getattr(module, "attention_type", None) is not None


def _scaling(module: nn.Module, head_dim: int) -> float:
    """The factor on ``q @ k^T`` before the softmax."""
    for attr in ("scaling", "softmax_scale"):  # MPT's attn_config.softmax_scale, resolved by the module
        value = getattr(module, attr, None)
        if value is not None and not isinstance(value, bool):
            return float(value)
    if _masks_itself(module):
        return 1.0  # GPT-Neo multiplies q by k unscaled
    return head_dim**-0.5


def _qkv_clip(module: nn.Module, cfg: Any) -> float | None:
    """The bound q/k/v are clamped to, from the module or its config (MPT and DBRX keep it in ``attn_config``)."""
    for owner in (module, cfg, getattr(cfg, "attn_config", None)):
        value = getattr(owner, "clip_qkv", None)
        if value is not None:
            # MPT tests truthiness: a clip of 0 means none there, and would zero every projection anyway.
            return float(value) if value else None
    return None


def _sliding_window(module: nn.Module, cfg: Any, layer_idx: int) -> int | None:
    # The module's own attribute is what it passes to the attention function (None on its global layers), unless
    # the module says it does not slide: EXAONE-4 keeps the window on every layer and passes it on sliding ones only.
    if getattr(module, "is_sliding", None) is False:
        return None
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    if _masks_itself(module):
        return cfg.window_size if module.attention_type == "local" else None
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if window is not None and isinstance(layer_types, (list, tuple)) and layer_idx < len(layer_types):
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window  # Mistral/Phi-3 style: one window for every layer


_WHOLE_WIDTH: dict[type, type] = {}


def _whole_width(norm: nn.Module) -> nn.Module:
    """A copy of ``norm`` that takes ``[..., H, D]`` and normalises over ``H * D`` (OLMo-2 style q/k norms).

    Mixers apply q/k norms to ``[B, T, H, D]``; these norms act on the whole projection. The copy keeps the
    parameter names (``weight``), so weight maps and saved state dicts see the model's own tensors.
    """
    base = type(norm)
    if base not in _WHOLE_WIDTH:

        def forward(self: nn.Module, x: Tensor) -> Tensor:
            return base.forward(self, x.flatten(-2)).view_as(x)

        _WHOLE_WIDTH[base] = type(f"WholeWidth{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
    wrapped = copy.deepcopy(norm)
    wrapped.__class__ = _WHOLE_WIDTH[base]
    return wrapped


def _norm(path: str, module: nn.Module, name: str, head_dim: int, heads: int) -> nn.Module | None:
    norm = next((getattr(module, a) for a in _NORM_ALIASES[name] if getattr(module, a, None) is not None), None)
    if norm is None:
        return None
    weight = getattr(norm, "weight", None)
    if isinstance(weight, Tensor) and tuple(weight.shape) == (heads * head_dim,) and heads > 1:
        return _whole_width(norm)
    if isinstance(weight, Tensor) and tuple(weight.shape) != (head_dim,):
        raise _error(path, module, f"{name} weight has shape {tuple(weight.shape)}, expected ({head_dim},) per head "
                     f"or ({heads * head_dim},) over all heads")  # fmt: skip
    return norm


def _scalar(module: nn.Module, name: str) -> float:
    """A plain number the module multiplies by (1.0 when absent; tensors, e.g. quantisation scales, are not it)."""
    value = getattr(module, name, 1.0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0


def _read_latent_site(path: str, module: nn.Module, index: int, model_cfg: Any) -> AttentionSite:
    """A multi-head latent attention module (``surgery.sites.latent``): q/k/v come from the model's own sub-graph."""
    cfg = module.config if getattr(module, "config", None) is not None else model_cfg
    layer_idx = module.layer_idx if isinstance(getattr(module, "layer_idx", None), int) else index
    try:
        latent, shape = read_latent(module, cfg)
    except ValueError as exc:
        raise _error(path, module, str(exc)) from None
    H, D, Dv = shape["num_heads"], shape["head_dim"], shape["v_head_dim"]
    out = _Proj(path, module, "o_proj")
    selection = read_key_selection(module, latent.rope_dim, lambda why: _error(path, module, why))
    claimed = {*latent.names, "o_proj", *((selection.name,) if selection is not None and selection.name else ())}
    # Sinks and output gates as on any other site (HY-V4's sinks and gate_proj, Dots3's per-head g_proj).
    extras = read_extras(module, "o_proj", H, Dv, out.out_features, claimed, lambda why: _error(path, module, why))
    _check_children(path, module, latent.names, "o_proj", frozenset(claimed))
    # The latent is expanded into one key/value head per query head: kv heads = query heads.
    dims = AttentionDims(
        hidden_size=out.out_features, num_heads=H, num_kv_heads=H, head_dim=D,
        qkv_bias=module.kv_b_proj.bias is not None, o_bias=out.bias is not None,
        scaling=_scaling(module, D), sliding_window=_sliding_window(module, cfg, layer_idx),
        softcap=getattr(module, "attn_logit_softcapping", None), v_head_dim=Dv,
    )  # fmt: skip
    modules = {name: getattr(module, name) for name in latent.names}
    return AttentionSite(
        layer_idx, path, type(module).__name__, dims, "latent", qkv_names=latent.names, out_name="o_proj",
        rotary=latent_rotary(module, cfg, latent), extras=extras, latent=latent, modules=modules,
        call_args=_call_args(module), key_selection=selection,
    )  # fmt: skip


def _read_site(path: str, module: nn.Module, index: int, model_cfg: Any) -> AttentionSite:
    if is_latent(module):
        return _read_latent_site(path, module, index, model_cfg)
    layout, qkv_names, out_name = _layout_of(path, module)
    if layout == "fused_qkv" and _shards(module) > 1:
        layout = "fused_qkv_sharded"
    if getattr(module, "is_causal", True) is False:
        raise _error(path, module, "bidirectional attention (is_causal is false) cannot be replaced in a causal LM")
    cfg = module.config if getattr(module, "config", None) is not None else model_cfg
    if getattr(cfg, "alibi", False) is True and "position_bias" not in _call_args(module):
        # MPT's layers are passed their ALiBi as ``position_bias`` (and Bloom's, whose config has no flag, as
        # ``alibi``), which mixers add; Falcon-RW's get it folded into the model's attention mask (transformers < 5.25
        # also passed it as ``alibi``, added once more on the eager path), which no site setting describes.
        raise _error(path, module, "ALiBi that the model folds into its attention mask (Falcon with alibi=True)")
    if isinstance(getattr(module, "qk_scale", None), Tensor):
        # Ergo's global layers multiply q and k by sqrt(global_attention_scale) after RoPE (context-extended
        # checkpoints): a buffer, so no parameter check sees it.
        raise _error(path, module, "queries and keys multiplied by a qk_scale after RoPE, which mixers do not do")
    layer_idx = module.layer_idx if isinstance(getattr(module, "layer_idx", None), int) else index
    qkv = [_Proj(path, module, name) for name in qkv_names]
    out = _Proj(path, module, out_name)
    D = _head_dim(module, cfg)
    if D is None or out.in_features % D:
        raise _error(path, module, f"head dim {D} does not divide {out_name}.in_features={out.in_features}")
    Hq, C, Dv = out.in_features // D, qkv[0].in_features, D
    if layout == "separate":
        q, k = qkv[:2]
        v = qkv[2] if len(qkv) == 3 else k  # values from the key projection (_values_are_keys)
        # The value head dim may differ (MiMo-V2): q/k give the heads, v and o the value head dim.
        Hq, Hkv = q.out_features // D, k.out_features // D
        Dv = v.out_features // Hkv if Hkv else 0
        fits = not (q.out_features % D or k.out_features % D) and Hkv > 0
        if not fits or v.out_features != Hkv * Dv or out.in_features != Hq * Dv:
            raise _error(path, module, f"q/k/v/o widths {q.out_features}/{k.out_features}/{v.out_features}/"
                         f"{out.in_features} do not fit head dim {D}")  # fmt: skip
        biases = {lin.bias is not None for lin in qkv}
        if len(biases) != 1:
            raise _error(path, module, "q/k/v projections disagree on having a bias")
    elif layout in ("fused_qkv", "fused_qkv_sharded"):
        rest = qkv[0].out_features - Hq * D
        if rest <= 0 or rest % (2 * D):
            raise _error(path, module, f"{qkv_names[0]} width {qkv[0].out_features} is not [q {Hq}x{D} | k | v]")
        Hkv = rest // (2 * D)
        if layout == "fused_qkv_sharded" and Hkv != Hq:
            raise _error(path, module, f"{qkv_names[0]} is sharded over {_shards(module)} model-parallel blocks but "
                         f"has {Hkv} key/value heads for {Hq} query heads; only equal counts are split")  # fmt: skip
    else:
        # Rows grouped per key/value head (see read_weights): the width gives the number of groups.
        rest = qkv[0].out_features - Hq * D
        if rest <= 0 or rest % (2 * D) or Hq % (rest // (2 * D)):
            raise _error(path, module, f"{qkv_names[0]} width {qkv[0].out_features} is not {Hq} query heads of "
                         f"{D} plus a key and a value head per key/value group")  # fmt: skip
        Hkv = rest // (2 * D)
    if Hq % Hkv:
        raise _error(path, module, f"{Hq} query heads are not a multiple of {Hkv} key/value heads")
    claimed = {*qkv_names, out_name, *(n for names in _NORM_ALIASES.values() for n in names)}
    # Gates and pre-output norms act on the attention output: Hq heads of the value head dim.
    extras = read_extras(module, out_name, Hq, Dv, C, claimed, lambda why: _error(path, module, why))
    _check_children(path, module, qkv_names, out_name, claimed)
    softcap = getattr(module, "attn_logit_softcapping", getattr(cfg, "attn_logit_softcapping", None))
    dims = AttentionDims(
        hidden_size=C, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, qkv_bias=qkv[0].bias is not None,
        o_bias=out.bias is not None, scaling=_scaling(module, D),
        sliding_window=_sliding_window(module, cfg, layer_idx), softcap=softcap, v_head_dim=Dv,
        value_scale=_scalar(module, "v_scale"), qkv_clip=_qkv_clip(module, cfg),
        window_in_mask=not _masks_itself(module),
    )  # fmt: skip
    q_norm = _norm(path, module, "q_norm", D, Hq)
    k_norm = _norm(path, module, "k_norm", D, Hkv)
    v_norm = _norm(path, module, "v_norm", Dv, Hkv)
    return AttentionSite(
        layer_idx, path, type(module).__name__, dims, layout, q_norm=q_norm, k_norm=k_norm, v_norm=v_norm,
        qkv_names=qkv_names, out_name=out_name, rotary=_rotary(path, module, D), extras=extras,
        call_args=_call_args(module),
    )  # fmt: skip


def _call_args(module: nn.Module) -> tuple[str, ...]:
    """The positional parameter names of ``module.forward`` after the hidden states."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # no introspectable signature: the adapter's default binding applies
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in signature.parameters.values() if p.kind in kinds)[1:]


def _rotary(path: str, module: nn.Module, head_dim: int) -> Rotary:
    # Only q/k norms can sit on either side of RoPE; a v norm says nothing about it.
    aliases = (*_NORM_ALIASES["q_norm"], *_NORM_ALIASES["k_norm"])
    norms = tuple(dict.fromkeys(a for a in aliases if getattr(module, a, None) is not None))
    try:
        rotary = read_rotary(path, module, head_dim, norms)
    except RotaryReadError as exc:
        raise _error(path, module, str(exc)) from None
    if getattr(module, "use_rope", True) is False and rotary.convention != "none":
        # The layer says it skips RoPE but its forward was not read so: trust neither.
        raise _error(path, module, "use_rope is false but forward applies RoPE unconditionally as read")
    if rotary.convention == "none" and getattr(module, "attn_temperature_tuning", False):
        # Llama-4 NoPE layers also rescale queries by position, which mixers do not do.
        raise _error(path, module, "NoPE layer with attention temperature tuning (queries scaled by position)")
    return rotary


def _shards(module: nn.Module) -> int:
    """Model-parallel shards a fused projection is interleaved over (CodeGen's ``mp_num``); 1 when not sharded."""
    value = getattr(module, "mp_num", 1)
    return value if isinstance(value, int) and value > 0 else 1


def _split_sharded(qkv: _Proj, shards: int, width: int, site: AttentionSite) -> dict[str, Tensor | None]:
    """CodeGen rows: ``shards`` blocks, each ``[q_s | v_s | k_s]`` of ``width / shards`` rows (note: v before k).

    Block s holds the s-th slice of the heads' q, v and k rows, so q is the concatenation of every block's first
    third, and so on.
    """
    if width % shards:
        raise AttentionReadError(f"attention module {site.path!r} ({site.module_class}): {width} q rows do not split "
                                 f"over {shards} model-parallel shards")  # fmt: skip
    local = width // shards
    w = qkv.weight.view(shards, 3, local, -1)
    b = qkv.bias.view(shards, 3, local) if qkv.bias is not None else None
    out: dict[str, Tensor | None] = {}
    for i, name in enumerate("qvk"):
        out[f"{name}_proj.weight"] = w[:, i].reshape(width, -1)
        out[f"{name}_proj.bias"] = b[:, i].reshape(width) if b is not None else None
    return out


def find_attention(model: nn.Module) -> list[AttentionSite]:
    """Every self-attention module of a causal LM, in layer order.

    Works on the meta device. Raises ``AttentionReadError`` naming the module class when a decoder layer's
    attention cannot be read (nothing is skipped silently).
    """
    list_path, layers = _decoder_layers(model)
    config = getattr(model, "config", None)
    model_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    sites: list[AttentionSite] = []
    for index, layer in enumerate(layers):
        found = _attention_in(layer, f"{list_path}.{index}")
        # LongCat-Flash layers hold two attention sublayers, each with its own cache slot (layer_idx).
        own = {getattr(m, "layer_idx", None) for _, m in found}
        if len(found) > 1 and (len(own) < len(found) or not all(isinstance(i, int) for i in own)):
            paths = ", ".join(f"{p} ({type(m).__name__})" for p, m in found)
            raise AttentionReadError(f"decoder layer {list_path}.{index} holds several attention modules: {paths}")
        # A layer without attention (a recurrent layer of a hybrid model) has nothing to replace.
        sites.extend(_read_site(path, module, index, model_cfg) for path, module in found)
    return sites


def read_weights(module: nn.Module, site: AttentionSite) -> dict[str, Tensor]:
    """The pretrained tensors of ``module`` under canonical names (see ``CANONICAL``), fused layouts split.

    Shapes: ``q_proj.weight`` [Hq*D, C], ``k_proj.weight``/``v_proj.weight`` [Hkv*D, C], ``o_proj.weight``
    [C, Hq*D], biases to match, ``q_norm.weight``/``k_norm.weight`` [D]. Absent tensors are absent keys.
    A latent site gives its sub-graph's tensors under the module's own names (``surgery.sites.latent.latent_weights``)
    and ``o_proj``.
    """
    d = site.dims
    if site.latent is not None:
        out = _Proj(site.path, module, site.out_name)
        parts = {**latent_weights(module, site.latent), "o_proj.weight": out.weight, "o_proj.bias": out.bias,
                 **key_selection_weights(module, site.key_selection)}  # fmt: skip
        found = {key: t.detach() for key, t in parts.items() if isinstance(t, Tensor)}
        return found | extra_weights(module, site.extras)
    qkv_names, out_name = (site.qkv_names, site.out_name) if site.out_name else _layout_of(site.path, module)[1:]
    qkv = [_Proj(site.path, module, name) for name in qkv_names]
    out = _Proj(site.path, module, out_name)
    parts: dict[str, Tensor | None] = {}
    if site.layout == "separate":
        for name, lin in zip("qkv", (*qkv, qkv[1])[:3]):  # the key projection again when values are keys
            parts[f"{name}_proj.weight"], parts[f"{name}_proj.bias"] = lin.weight, lin.bias
    elif site.layout == "fused_qkv_sharded":
        parts |= _split_sharded(qkv[0], _shards(module), d.num_heads * d.head_dim, site)
    elif site.layout == "fused_qkv":
        # Phi-3, GPT-2, MPT rows: [q (Hq*D) | k (Hkv*D) | v (Hkv*D)].
        sizes = [d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.num_kv_heads * d.head_dim]
        weights = qkv[0].weight.split(sizes, dim=0)
        biases = qkv[0].bias.split(sizes, dim=0) if qkv[0].bias is not None else (None,) * 3
        for name, w, b in zip("qkv", weights, biases):
            parts[f"{name}_proj.weight"], parts[f"{name}_proj.bias"] = w, b
    else:
        # Rows grouped per key/value head g: [q_(g,0) .. q_(g,G-1) | k_g | v_g], each block D rows. GPT-NeoX is
        # G = 1 ([q_h | k_h | v_h] per head); Falcon's grouped layout G = Hq / Hkv, its multi-query one Hkv = 1.
        Hkv, G, D, C = d.num_kv_heads, d.groups, d.head_dim, d.hidden_size
        w = qkv[0].weight.view(Hkv, G + 2, D, C)
        b = qkv[0].bias.view(Hkv, G + 2, D) if qkv[0].bias is not None else None
        for name, rows in (("q", slice(0, G)), ("k", slice(G, G + 1)), ("v", slice(G + 1, G + 2))):
            parts[f"{name}_proj.weight"] = w[:, rows].reshape(-1, C)
            parts[f"{name}_proj.bias"] = b[:, rows].reshape(-1) if b is not None else None
    parts["o_proj.weight"], parts["o_proj.bias"] = out.weight, out.bias
    for name in _NORMS:
        norm = next((getattr(module, a) for a in _NORM_ALIASES[name] if getattr(module, a, None) is not None), None)
        parts[f"{name}.weight"] = getattr(norm, "weight", None)
    return {key: t.detach() for key, t in parts.items() if isinstance(t, Tensor)} | extra_weights(module, site.extras)
