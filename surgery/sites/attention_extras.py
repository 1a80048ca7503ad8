"""Parameters an attention module may own besides q/k/v/o and q/k norms, read into ``AttentionExtras``.

Four kinds are understood, each detected by structure (a parameter's name and shape, a child's type and width),
never by model type:

- learned sink logits (GPT-OSS, Flint, Granite-SWA): an own parameter ``sinks`` ``[Hq]``, one extra logit per head
  in the softmax denominator that attends to nothing;
- an output gate (AFMoE, Laguna, HRM, Beam): a child ``gate_proj``/``g_proj`` ``nn.Linear`` from the layer input
  to ``Hq * D`` channels or ``Hq`` heads, whose activation multiplies the attention output before ``o_proj``;
  Beam adds a learned per-head bias (``gate_bias`` ``[Hq]``) before the activation;
- a norm of the attention output before ``o_proj`` (BitNet's ``attn_sub_norm``, weight ``[Hq * D]``);
- a separate output bias (GPT-NeoX-Japanese's ``dense_bias`` next to a bias-free ``dense``), which the pretrained
  module returns to its decoder layer as a third output instead of adding it.

The mixer base (``surgery.mixer.Mixer.output``) applies the gate, the norm and the bias for every mixer; the sink
logits belong to the softmax and are applied by the softmax and window mixers.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

#: Canonical names of the extra tensors (``read_weights`` keys and the mixers' parameter names).
EXTRA_CANONICAL = (
    "sink_logits", "out_gate.weight", "out_gate.bias", "out_gate_head_bias", "o_norm.weight", "o_norm.bias", "o_bias",
)  # fmt: skip

_SINKS = ("sinks", "sink_logits", "attention_sinks")
_GATES = ("gate_proj", "g_proj", "o_gate")
_GATE_HEAD_BIAS = ("gate_bias",)
Activation = Literal["sigmoid", "softplus"]
_ACTIVATIONS: tuple[Activation, ...] = ("sigmoid", "softplus")


@dataclass(frozen=True)
class OutputGate:
    """``o <- o * act(out_gate(x) [+ head bias])`` on the attention output ``o`` before ``o_proj``.

    ``x`` is the layer input ``[B, T, C]``; the gate has ``Hq`` outputs (one per head, broadcast over the head's
    channels) or ``Hq * D`` (one per channel).
    """

    per_head: bool
    activation: Activation
    bias: bool  # out_gate has a bias
    head_bias: bool  # a separate learned [Hq] bias added before the activation


@dataclass(frozen=True)
class AttentionExtras:
    """What one attention module owns beyond q/k/v/o and q/k norms; ``names`` maps canonical keys to its own."""

    sink_logits: bool = False
    gate: OutputGate | None = None
    o_norm: nn.Module | None = field(default=None, compare=False, repr=False)
    o_bias: bool = False
    returns_bias: bool = False  # the pretrained forward returns (out, weights, bias): its layer adds the bias
    #: The family's own eager attention function (softmax mixer with sink logits: families formulate the sink
    #: differently, and only their own function reproduces their logits bit for bit).
    eager: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    names: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def on_output(self) -> bool:
        """Whether the output path (gate, norm, bias) differs from a plain ``o_proj``."""
        return self.gate is not None or self.o_norm is not None or self.o_bias


def _activation(module: nn.Module) -> Activation | None:
    """The gate activation the module's forward names: nothing structural says which one it applies."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return None
    found: list[Activation] = [a for a in _ACTIVATIONS if a in source]
    return found[0] if len(found) == 1 else None


def read_extras(
    module: nn.Module, out: str, heads: int, head_dim: int, hidden: int, claimed: set[str],
    error: Callable[[str], Exception],
) -> AttentionExtras | None:
    """The extras of ``module`` (None when it has none); adds the names it reads to ``claimed``.

    Args:
        out: the module's output projection name. heads, head_dim, hidden: Hq, D and C of the layer.
        claimed: child and parameter names already understood (projections, q/k norms); extended in place.
        error: builds the exception for a structure that is recognised but cannot be reproduced.
    """
    width = heads * head_dim
    names: dict[str, str] = {}
    own = dict(module.named_parameters(recurse=False))
    children = dict(module.named_children())
    sink = next((n for n in _SINKS if n in own), None)
    eager = None
    if sink is not None:
        if tuple(own[sink].shape) != (heads,):
            raise error(f"sink logits {sink!r} have shape {tuple(own[sink].shape)}, expected ({heads},)")
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if not callable(eager):
            raise error(f"learned sinks {sink!r} but no eager_attention_forward in {type(module).__module__}")
        names["sink_logits"] = sink
    gate = None
    gate_name = next((n for n in _GATES if isinstance(children.get(n), nn.Linear)), None)
    if gate_name is not None:
        lin = children[gate_name]
        if lin.in_features != hidden or lin.out_features not in (heads, width):
            raise error(f"gate {gate_name!r} maps {lin.in_features} -> {lin.out_features}; an output gate maps the "
                        f"layer input ({hidden}) to {heads} heads or {width} channels")  # fmt: skip
        activation = _activation(module)
        if activation is None:
            raise error(f"output gate {gate_name!r}: its forward names neither or both of {'/'.join(_ACTIVATIONS)}")
        head_bias = next((n for n in _GATE_HEAD_BIAS if n in own and tuple(own[n].shape) == (heads,)), None)
        per_head = lin.out_features == heads
        gate = OutputGate(per_head, activation, lin.bias is not None, head_bias is not None)
        names["out_gate.weight"] = f"{gate_name}.weight"
        if lin.bias is not None:
            names["out_gate.bias"] = f"{gate_name}.bias"
        if head_bias is not None:
            names["out_gate_head_bias"] = head_bias
        claimed.update({gate_name, *([head_bias] if head_bias else [])})
    o_norm = None
    for name, child in children.items():
        weight = getattr(child, "weight", None)
        # q/k norms are claimed already; another norm with a weight over the whole attention output width
        # normalises what o_proj reads (BitNet's attn_sub_norm).
        is_norm = "norm" in type(child).__name__.lower() and isinstance(weight, Tensor)
        if o_norm is None and name not in claimed and is_norm and tuple(weight.shape) == (width,):
            o_norm = child  # mixers deep-copy it, as they do q/k norms
            names["o_norm.weight"] = f"{name}.weight"
            if isinstance(getattr(child, "bias", None), Tensor):
                names["o_norm.bias"] = f"{name}.bias"
            claimed.add(name)
    bias_name = f"{out}_bias"
    returns_bias = bias_name in own or (hasattr(module, bias_name) and getattr(module, bias_name) is None)
    o_bias = bias_name in own
    if o_bias:
        if tuple(own[bias_name].shape) != (hidden,):
            shape = tuple(own[bias_name].shape)
            raise error(f"separate output bias {bias_name!r} has shape {shape}, expected ({hidden},)")
        if getattr(children[out], "bias", None) is not None:
            raise error(f"both {out}.bias and a separate {bias_name!r}")
        names["o_bias"] = bias_name
    claimed.update(n for n in (sink, bias_name if o_bias else None) if n)
    if not names and not returns_bias:
        return None
    return AttentionExtras(sink is not None, gate, o_norm, o_bias, returns_bias, eager, names)


def extra_weights(module: nn.Module, extras: AttentionExtras | None) -> dict[str, Tensor]:
    """The extra tensors of ``module`` under canonical names: ``sink_logits`` [Hq], ``out_gate.weight`` [G, C]..."""
    if extras is None:
        return {}
    out: dict[str, Tensor] = {}
    for key, path in extras.names.items():
        tensor = module.get_parameter(path)
        out[key] = tensor.detach()
    return out
