"""How one attention layer applies rotary position embeddings, read from its own ``forward``.

Families rotate q and k differently: Llama's rotate-half, interleaved pairs (GPT-J, Cohere, GLM, ERNIE, Helium),
complex ``freqs_cis`` (Llama-4), sign-flipped halves (NanoChat), upcasts to fp32 (Cohere, ERNIE), RoPE skipped on
some layers (Cohere-2's global layers, SmolLM3 / Llama-4 NoPE layers) and q/k norms after RoPE instead of before
(HunYuan, NanoChat, Llama-4). Reimplementing each would be a per-family table; instead ``read_rotary`` reads the
attention class's ``forward`` (its source, with ``ast``): which module-level rotary function it calls, with which
arguments, under which ``if`` (evaluated on the module: ``self.sliding_window is not None``), and whether the q/k
norms are called before or after it. Mixers then call that same function, so kept layers stay bit-identical.

A layer whose function computes exactly what ``surgery.mixer.apply_rope`` computes (checked numerically, fp32 and
bf16) keeps that fast path, so families that read as rotate-half are unchanged. Nothing here is stored: a site is
read again from the rebuilt base model on ``surgery.load``.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from surgery.errors import RotaryReadError

Convention = Literal["rotate_half", "model", "none", "latent"]
#: Where the head axis is when the model's function is called: ``heads``: ``[B, H, T, D]``, ``time``: ``[B, T, H, D]``.
Layout = Literal["heads", "time"]
_PE = "position_embeddings"  # the keyword decoder layers pass rotary embeddings under


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, heads_dim: int = 1) -> Tensor:
    """Rotary embedding on ``x`` ``[B, H, T, D]`` (``heads_dim=2``: ``[B, T, H, D]``) with ``cos``/``sin``
    ``[B, T, R]``, R <= D (partial rotary).

    Same arithmetic as transformers' ``apply_rotary_pos_emb`` (rotate-half convention), so the softmax mixer
    reproduces the pretrained logits bit for bit.
    """
    cos, sin = cos.unsqueeze(heads_dim), sin.unsqueeze(heads_dim)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return (x * cos) + (rotate_half(x) * sin)
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat([(x_rot * cos) + (rotate_half(x_rot) * sin), x_pass], dim=-1)


@dataclass(frozen=True)
class Rotary:
    """How a layer rotates q and k (no tensors; valid on the meta device).

    ``convention``: ``rotate_half`` (``apply_rope``, the default and the fast path), ``model`` (call the model's own
    ``function``) or ``none`` (the layer applies no RoPE although the model computes embeddings: NoPE layers).
    For ``model``: ``tensors`` names the function's q/k parameters (one name: it is called once per tensor);
    ``embeddings`` maps its other tensor parameters to an index into the layer's ``position_embeddings`` (None:
    the whole object, e.g. Llama-4's complex ``freqs_cis``); ``constants`` are literal keyword arguments of the
    model's call; ``rotary_dim`` the leading head dims the layer slices out before calling it (GPT-J style).
    ``norms_after``: the layer applies its q/k norms after RoPE (HunYuan, NanoChat), not before.
    ``latent`` (multi-head latent attention, ``surgery.sites.latent``): only the last ``trailing`` head dims rotate (the
    rope part after the nope part), as adjacent pairs when ``interleaved``, else rotate-half, or by complex
    ``freqs_cis`` when the model passes those (DeepSeek-V2).
    """

    convention: Convention = "rotate_half"
    function: Callable[..., Any] | None = field(default=None, repr=False)
    tensors: tuple[str, ...] = ()
    embeddings: tuple[tuple[str, int | None], ...] = ()
    constants: tuple[tuple[str, Any], ...] = ()
    layout: Layout = "heads"
    rotary_dim: int | None = None
    norms_after: bool = False
    trailing: int | None = None
    interleaved: bool = False

    def apply(self, q: Tensor, k: Tensor, position_embeddings: Any) -> tuple[Tensor, Tensor]:
        """q ``[B, T, Hq, D]`` and k ``[B, T, Hkv, D]`` -> ``[B, Hq, T, D]`` and ``[B, Hkv, T, D]``, rotated.

        ``position_embeddings`` is what the decoder layer passed (``(cos, sin)`` ``[B, T, R]`` for most families);
        None (learned absolute positions) rotates nothing.
        """
        if position_embeddings is None or self.convention == "none":
            return q.transpose(1, 2), k.transpose(1, 2)
        if self.convention == "rotate_half":
            cos, sin = position_embeddings
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.convention == "latent":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            return self._trailing(q, position_embeddings), self._trailing(k, position_embeddings)
        if self.layout == "heads":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        kwargs = dict(self.constants)
        for name, index in self.embeddings:
            kwargs[name] = position_embeddings if index is None else position_embeddings[index]
        assert self.function is not None
        if len(self.tensors) == 2:
            q, k = self.function(**{self.tensors[0]: q, self.tensors[1]: k}, **kwargs)
        else:
            q, k = (self._one(x, kwargs) for x in (q, k))
        return (q.transpose(1, 2), k.transpose(1, 2)) if self.layout == "time" else (q, k)

    def _one(self, x: Tensor, kwargs: dict[str, Any]) -> Tensor:
        # GPT-J / CodeGen slice the rotated dims out themselves and concatenate the rest back.
        r = self.rotary_dim if self.rotary_dim is not None else x.shape[-1]
        rotated = self.function(**{self.tensors[0]: x[..., :r]}, **kwargs)  # type: ignore[misc]
        return rotated if r >= x.shape[-1] else torch.cat([rotated, x[..., r:]], dim=-1)


    def _trailing(self, x: Tensor, pe: Any) -> Tensor:
        """``x`` ``[B, H, T, D]`` with its last ``trailing`` dims rotated (all of them when D is that width: MLA's
        shared key part ``k_pe`` alone). Same arithmetic as transformers' helpers, so kept layers stay exact."""
        r = self.trailing if self.trailing is not None else x.shape[-1]
        rot = x[..., x.shape[-1] - r :]
        if isinstance(pe, Tensor) and pe.is_complex():
            pairs = torch.view_as_complex(rot.float().reshape(*rot.shape[:-1], -1, 2))
            rot = torch.view_as_real(pairs * pe.unsqueeze(1).to(x.device)).flatten(3).type_as(x)
        elif self.interleaved:
            cos, sin = pe
            # cos/sin are cat(freqs, freqs): the first half holds one angle per pair.
            cos, sin = cos[..., : cos.shape[-1] // 2].unsqueeze(1), sin[..., : sin.shape[-1] // 2].unsqueeze(1)
            even, odd = rot[..., 0::2], rot[..., 1::2]
            rot = torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
        else:
            cos, sin = pe
            rot = (rot * cos.unsqueeze(1)) + (rotate_half(rot) * sin.unsqueeze(1))
        # Back to x's dtype when the embeddings are wider (Dots3 passes fp32 ones in a bf16 model and casts back).
        rot = rot.to(x.dtype)
        return rot if r >= x.shape[-1] else torch.cat((x[..., : x.shape[-1] - r], rot), dim=-1)


ROTATE_HALF = Rotary()


# -- reading forward -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)  # parsed once per class, not once per layer
def _forward_tree(cls: type) -> tuple[ast.FunctionDef, dict[str, Any]] | None:
    """The parsed ``forward`` of ``cls`` and the globals its names resolve in; None when its source is unavailable."""
    forward = getattr(cls, "forward", None)
    if forward is None:
        return None
    forward = inspect.unwrap(forward)  # past @deprecate_kwarg and friends
    try:
        source = textwrap.dedent(inspect.getsource(forward))
    except (OSError, TypeError):
        return None
    node = ast.parse(source).body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    return node, getattr(forward, "__globals__", {})  # type: ignore[return-value]


_UNKNOWN = object()  # a condition that depends on the call (tensors, arguments), not on the module


def _evaluate(node: ast.expr, module: nn.Module) -> Any:
    """Value of an ``if`` test built from ``self.<attr>``, constants, comparisons and boolean operators.

    Anything else (a local variable, a call) is ``_UNKNOWN``: no code of the model is run.
    """
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return module if node.id == "self" else _UNKNOWN
    if isinstance(node, ast.Attribute):
        owner = _evaluate(node.value, module)
        return _UNKNOWN if owner is _UNKNOWN else getattr(owner, node.attr, _UNKNOWN)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        value = _evaluate(node.operand, module)
        return _UNKNOWN if value is _UNKNOWN else not value
    if isinstance(node, ast.BoolOp):
        values = [_evaluate(v, module) for v in node.values]
        decisive = isinstance(node.op, ast.Or)  # `or` is decided by a true operand, `and` by a false one
        if any(v is not _UNKNOWN and bool(v) == decisive for v in values):
            return decisive
        return _UNKNOWN if any(v is _UNKNOWN for v in values) else not decisive
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        left, right = _evaluate(node.left, module), _evaluate(node.comparators[0], module)
        if left is _UNKNOWN or right is _UNKNOWN:
            return _UNKNOWN
        ops: dict[type, Callable[[Any, Any], bool]] = {
            ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b, ast.Eq: lambda a, b: a == b,
            ast.NotEq: lambda a, b: a != b, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
        }  # fmt: skip
        op = ops.get(type(node.ops[0]))
        return _UNKNOWN if op is None else op(left, right)
    return _UNKNOWN


def _calls(body: list[ast.stmt], module: nn.Module, reached: bool = True) -> Iterator[tuple[ast.Call, bool]]:
    """Every call in ``body`` with whether it runs for this module (tests on ``self`` evaluated, others assumed)."""
    for stmt in body:
        if isinstance(stmt, ast.If):
            value = _evaluate(stmt.test, module)
            yield from _calls_in(stmt.test, reached)
            yield from _calls(stmt.body, module, reached and (value is _UNKNOWN or bool(value)))
            yield from _calls(stmt.orelse, module, reached and (value is _UNKNOWN or not value))
            continue
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue  # nested definitions do not run here
        nested = [getattr(stmt, name, None) for name in ("body", "orelse", "finalbody", "handlers")]
        blocks = [b for b in nested if isinstance(b, list) and b and isinstance(b[0], (ast.stmt, ast.excepthandler))]
        for child in ast.iter_child_nodes(stmt):
            if isinstance(child, ast.expr):
                yield from _calls_in(child, reached)
        for block in blocks:
            stmts = [s for h in block for s in h.body] if isinstance(block[0], ast.excepthandler) else block
            yield from _calls(stmts, module, reached)


def _calls_in(expr: ast.expr, reached: bool) -> Iterator[tuple[ast.Call, bool]]:
    for node in ast.walk(expr):
        if isinstance(node, ast.Call):
            yield node, reached


def _is_rotary(name: str, namespace: dict[str, Any]) -> bool:
    lowered = name.lower()
    return ("rotary" in lowered or "rope" in lowered) and _is_function(namespace.get(name))


def _is_function(value: Any) -> bool:
    """A plain function, or one that ``kernels``' ``use_kernel_forward_from_hub`` turned into a module instance.

    transformers decorates its rotary functions so (``@use_kernel_forward_from_hub("rotary_pos_emb")``), which takes
    effect when a ``kernels`` release it accepts is installed (5.25 accepts 0.19, 5.24 only 0.18). The instance is
    called like the function, runs it unless the model was kernelized, and its ``forward`` has the function's
    parameters.
    """
    return inspect.isfunction(value) or (isinstance(value, nn.Module) and inspect.ismethod(value.forward))


def _parameters(fn: Callable[..., Any]) -> inspect.Signature:
    """The signature ``fn`` is called with (a module instance's is its ``forward``'s, see ``_is_function``)."""
    return inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn)


def _unpacked(tree: ast.FunctionDef) -> dict[str, int]:
    """Local names bound by unpacking ``position_embeddings`` (``cos, sin = position_embeddings``) -> index."""
    out: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id == _PE:
            for target in node.targets:
                if isinstance(target, ast.Tuple):
                    out.update({t.id: i for i, t in enumerate(target.elts) if isinstance(t, ast.Name)})
    return out


def _mentions(expr: ast.expr, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(expr))


def _signature_of_call(path: str, fn: Callable[..., Any], call: ast.Call, unpacked: dict[str, int]) -> Rotary:
    """A ``model`` Rotary from the model's call ``fn(...)``: which arguments are q/k, embeddings, constants."""
    signature = _parameters(fn)
    params = list(signature.parameters)
    if any(isinstance(a, ast.Starred) for a in call.args) or any(kw.arg is None for kw in call.keywords):
        raise RotaryReadError(f"{path}: {ast.unparse(call.func)} is called with *args/**kwargs, which cannot be read")
    bound = dict(zip(params, call.args)) | {kw.arg: kw.value for kw in call.keywords if kw.arg}
    tensors: list[str] = []
    embeddings: list[tuple[str, int | None]] = []
    constants: list[tuple[str, Any]] = []
    for name, expr in bound.items():
        if isinstance(expr, ast.Constant):
            constants.append((name, expr.value))
        elif isinstance(expr, ast.Name) and expr.id in unpacked:
            embeddings.append((name, unpacked[expr.id]))
        elif _mentions(expr, _PE):
            embeddings.append((name, None))
        else:
            tensors.append(name)
    if len(tensors) not in (1, 2) or not embeddings:
        raise RotaryReadError(
            f"{path}: cannot tell q/k from position embeddings in the call {ast.unparse(call)} "
            f"(parameters {', '.join(params)})"
        )
    # Functions with ``unsqueeze_dim`` broadcast cos/sin over dim 1 (``[B, H, T, D]``) unless told 2; the others
    # (GPT-J's ``sin[:, :, None, :]``, Llama-4's ``freqs_cis[:, :, None, :]``) index a ``[B, T, H, D]`` layout.
    if "unsqueeze_dim" in signature.parameters:
        default = signature.parameters["unsqueeze_dim"].default
        layout: Layout = "time" if dict(constants).get("unsqueeze_dim", default) == 2 else "heads"
    else:
        layout = "time"
    return Rotary("model", fn, tuple(tensors), tuple(embeddings), tuple(constants), layout)


@functools.lru_cache(maxsize=None)
def _is_rotate_half(fn: Callable[..., Any], tensors: tuple[str, ...], embeddings: tuple[tuple[str, int | None], ...],
                    constants: tuple[tuple[str, Any], ...], head_dim: int) -> bool:  # fmt: skip
    """Whether ``fn``, called as the model calls it, computes exactly ``apply_rope`` (fp32 and bf16, full and half R).

    Only a ``fn(q, k, cos=..., sin=...)`` call on ``[B, H, T, D]`` can be; a width the function refuses (no partial
    rotary) is not one the model uses, so it is skipped.
    """
    names = dict(embeddings)
    if len(tensors) != 2 or set(names) != {"cos", "sin"} or None in names.values():
        return False
    gen = torch.Generator().manual_seed(0)
    widths = [head_dim] + ([head_dim // 2] if head_dim % 4 == 0 else [])
    tried = False
    for dtype in (torch.float32, torch.bfloat16):
        # On the CPU by name: a model built on the meta device (``with torch.device("meta")``) reads its sites too.
        q, k = (torch.randn(2, 3, 5, head_dim, generator=gen, device="cpu").to(dtype) for _ in range(2))
        for r in widths:
            cos, sin = (torch.randn(2, 5, r, generator=gen, device="cpu").to(dtype) for _ in range(2))
            try:
                got = fn(**{tensors[0]: q, tensors[1]: k}, cos=cos, sin=sin, **dict(constants))
            except (RuntimeError, ValueError, IndexError, TypeError):
                continue
            tried = True
            want = (apply_rope(q, cos, sin), apply_rope(k, cos, sin))
            if not all(isinstance(g, Tensor) and g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want)):
                return False
    return tried


def read_rotary(path: str, module: nn.Module, head_dim: int, norm_names: tuple[str, ...]) -> Rotary:
    """How ``module`` (an attention module at ``path``) applies RoPE, read from its class's ``forward``.

    ``norm_names``: the module's q/k norm attributes (e.g. ``("q_norm", "k_norm")``), to tell whether they run
    before or after RoPE. A forward without a readable rotary call (no source, learned absolute positions) reads
    as rotate-half: mixers then rotate only when the model passes ``(cos, sin)``.
    """
    site = getattr(module, "site", None)
    if isinstance(getattr(site, "rotary", None), Rotary):
        return site.rotary  # a mixer already in place: its site says how the pretrained layer rotated
    parsed = _forward_tree(type(module))
    if parsed is None:
        return ROTATE_HALF
    tree, namespace = parsed
    calls = list(_calls(tree.body, module))
    rotary = [(c, run) for c, run in calls if isinstance(c.func, ast.Name) and _is_rotary(c.func.id, namespace)]
    if not rotary:
        return ROTATE_HALF
    running = [c for c, run in rotary if run]
    if not running:
        return Rotary("none")  # RoPE only under a condition this layer does not meet (NoPE layers)
    first = running[0]
    fn = namespace[first.func.id]  # type: ignore[attr-defined]
    if any(c.func.id != first.func.id for c in running):  # type: ignore[attr-defined]
        raise RotaryReadError(f"{path}: forward calls several rotary functions")
    norm_calls = [
        c for c, run in calls
        if run and isinstance(c.func, ast.Attribute) and c.func.attr in norm_names and _mentions(c.func.value, "self")
    ]  # fmt: skip
    after = bool(norm_calls) and all((c.lineno, c.col_offset) > (first.lineno, first.col_offset) for c in norm_calls)
    rotary_dim = getattr(module, "rotary_dim", None)
    model = _signature_of_call(path, fn, first, _unpacked(tree))
    if model.layout == "heads" and _is_rotate_half(fn, model.tensors, model.embeddings, model.constants, head_dim):
        return Rotary(norms_after=after)
    single = len(model.tensors) == 1 and isinstance(rotary_dim, int) and rotary_dim < head_dim
    return Rotary(
        "model", fn, model.tensors, model.embeddings, model.constants, model.layout,
        rotary_dim=rotary_dim if single else None, norms_after=after,
    )  # fmt: skip
