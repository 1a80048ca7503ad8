"""Apply a plan to a model: match rules to attention sites, build mixers, map weights, swap, record a manifest.

The converter names no plugin: mixers and weight maps come from the plan's registry (the one it was validated
against, ``Plan.registry``) by the names the plan gives.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from surgery.mixer import MixContext, Mixer, MixerDimsError, Options, SharedState, install_padding_hook
from surgery.plan import Plan, PlanError, Rule, select_layers
from surgery.registry import Registry
from surgery.sites.attention import AttentionSite, find_attention, read_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Match:
    """One layer the plan converts: which rule, module, mixer and weight map."""

    rule: int
    layer: int
    path: str
    module_class: str
    mixer: str
    weights: str
    options: Options = field(compare=False, repr=False, default_factory=Options)  # resolved for this layer


@dataclass
class LayerRecord:
    """What the weight map did to one layer (the mapping manifest entry), with the mixer's resolved options."""

    layer: int
    path: str
    module_class: str
    mixer: str
    weights: str
    options: dict[str, Any] = field(default_factory=dict)  # after dims-dependent defaults (e.g. gsa's num_slots)
    copied: list[str] = field(default_factory=list)  # tensors taken unchanged from the pretrained attention
    reshaped: list[str] = field(default_factory=list)  # tensors derived from pretrained ones (split, pooled, ...)
    created: list[str] = field(default_factory=list)  # mixer parameters the map left at their initialisation
    dropped: list[str] = field(default_factory=list)  # pretrained tensors the mixer does not use


@dataclass
class SurgeryInfo:
    """Attached to a converted model as ``model.surgery``: the resolved plan, the manifest, shared state."""

    plan: Plan
    manifest: list[LayerRecord]
    shared: SharedState

    def manifest_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(r) for r in self.manifest]}


def num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "num_hidden_layers"))


def match(plan: Plan, sites: list[AttentionSite], n_layers: int) -> list[tuple[Match, Rule]]:
    """Resolve every rule against the model's attention sites; raise ``PlanError`` with every problem found.

    Each match carries the rule's options resolved for its layer (``Mixer.resolve_options``).
    """
    registry = plan.registry
    by_layer = {s.layer_idx: s for s in sites}
    problems: list[tuple[str, str]] = []
    owner: dict[int, int] = {}
    out: list[tuple[Match, Rule]] = []
    for i, rule in enumerate(plan.convert):
        loc = f"convert.{i}.layers"
        layers = select_layers(rule.layers, n_layers)
        bad = [x for x in layers if x >= n_layers]
        if bad:
            problems.append((loc, f"layer {bad[0]} is out of range: the model has {n_layers} layers (0-{n_layers - 1})"))
        layers = [x for x in layers if x < n_layers]
        if not layers and not bad:
            problems.append((loc, "this rule selects no layer"))
        mixer_cls = registry.mixer(rule.mixer)
        for layer in layers:
            if layer in owner:
                problems.append((loc, f"layer {layer} is also selected by convert.{owner[layer]}: rules must not overlap"))
                continue
            owner[layer] = i
            site = by_layer.get(layer)
            if site is None:
                problems.append((loc, f"layer {layer} has no self-attention module that surgery can read"))
                continue
            try:
                options = mixer_cls.resolve_options(site, rule.options)
                mixer_cls.check_site(site, options)
            except MixerDimsError as exc:
                problems.append((loc, f"layer {layer} ({site.path}, {site.module_class}): mixer '{rule.mixer}': {exc}"))
                continue
            weights = rule.weights or mixer_cls.default_weights_for(options)
            out.append((Match(i, layer, site.path, site.module_class, rule.mixer, weights, options), rule))
    problems += _reused_selection_problems([m for m, _ in out], by_layer, registry)
    if problems:
        raise PlanError(problems)
    return sorted(out, key=lambda mr: mr[0].layer)


def _reused_selection_problems(
    matches: list[Match], by_layer: dict[int, AttentionSite], registry: Registry
) -> list[tuple[str, str]]:
    """A layer that reuses the key selection of an earlier one (a shared DSA layer, ``surgery.sites.key_selection``) and
    keeps it needs that earlier layer to keep its indexer: converted to a mixer that drops it, it selects nothing."""
    mixer_of = {m.layer: m.mixer for m in matches}
    problems = []
    for m in matches:
        selection = by_layer[m.layer].key_selection
        if selection is None or not selection.shared or not registry.mixer(m.mixer).uses_key_selection:
            continue
        source = max((i for i, s in by_layer.items() if i < m.layer and s.key_selection is not None
                      and not s.key_selection.shared), default=None)  # fmt: skip
        if source is None or source not in mixer_of or registry.mixer(mixer_of[source]).uses_key_selection:
            continue
        problems.append((f"convert.{m.rule}.layers", f"layer {m.layer} ({m.path}, {m.module_class}) reuses the key "
                         f"selection of layer {source}, whose mixer '{mixer_of[source]}' drops its indexer: keep "
                         f"layer {source} as softmax or convert layer {m.layer} too"))  # fmt: skip
    return problems


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def require_source(model: str) -> None:
    """Fail at once, in one located line, when ``model`` is neither local, nor cached, nor reachable.

    transformers would otherwise retry the hub several times before failing.
    """
    if Path(model).expanduser().exists():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return
    except (ValueError, OSError):  # not a valid repo id: let transformers give its own message
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise PlanError([("model", f"'{model}' is not a local path and not in the Hugging Face cache, and "
                                   "HF_HUB_OFFLINE is set")])  # fmt: skip
    if not _hub_reachable():
        raise PlanError([("model", f"'{model}' is not a local path and not in the Hugging Face cache, and the hub "
                                   "cannot be reached; use a local directory or download it first")])  # fmt: skip


def meta_model(plan: Plan) -> nn.Module:
    """The plan's model built from its config on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    require_source(plan.model)
    try:
        config = AutoConfig.from_pretrained(plan.model)
    except (OSError, ValueError) as exc:
        raise PlanError([("model", f"cannot load the config of '{plan.model}': {exc}")]) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check(plan: Plan, model: nn.Module | None = None) -> list[Match]:
    """Resolve ``plan`` against the model (meta device when none is given): which layer gets what.

    Every mixer is built on the meta device, so what its weight map needs of it is checked without weights.
    """
    registry = plan.registry
    model = model if model is not None else meta_model(plan)
    sites = {s.layer_idx: s for s in find_attention(model)}
    matches = match(plan, list(sites.values()), num_layers(model))
    problems, seen_rules = [], set()
    for m, _ in matches:
        if m.rule in seen_rules:
            continue  # one problem per rule: every layer of a rule would say the same
        with torch.device("meta"):
            mixer = registry.mixer(m.mixer)(sites[m.layer], m.options, model.config)
        misfit = _misfit(m, mixer, registry)
        if misfit:
            seen_rules.add(m.rule)
            problems += misfit
    if problems:
        raise PlanError(problems)
    return [m for m, _ in matches]


def _misfit(m: Match, mixer: Mixer, registry: Registry) -> list[tuple[str, str]]:
    """A located problem when the weight map needs something of the mixer that it lacks."""
    missing = registry.weight_map(m.weights).missing(mixer)
    if not missing:
        return []
    return [(f"convert.{m.rule}.weights", f"layer {m.layer}: weight map '{m.weights}' needs a module "
             f"{', '.join(missing)} that mixer '{m.mixer}' with these options does not have")]  # fmt: skip


def load_model(plan: Plan) -> nn.Module:
    """The plan's pretrained model, in the plan's dtype, in eval mode: the one loader of a base model (``Run``, the
    standalone verbs and ``surgery select`` use it), so a base model has one dtype rule, the plan's."""
    from transformers import AutoModelForCausalLM

    require_source(plan.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(plan.model, dtype=DTYPES[plan.dtype])
    except (OSError, ValueError) as exc:
        raise PlanError([("model", f"cannot load '{plan.model}': {exc}")]) from None
    return model.eval()


def load_tokenizer(plan: Plan) -> Any:
    """The plan's tokenizer (the base model's): the one place a tokenizer is loaded from a plan."""
    from transformers import AutoTokenizer

    require_source(plan.model)
    return AutoTokenizer.from_pretrained(plan.model)


def _record(m: Match, site: AttentionSite, src: dict[str, Tensor], mapped: dict[str, Tensor], mixer: Mixer) -> LayerRecord:
    rec = LayerRecord(m.layer, m.path, m.module_class, m.mixer, m.weights, m.options.model_dump(mode="json"))
    # A fused qkv projection reaches the mixer split into q/k/v: those tensors are reshaped, not copied.
    split = {"q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"}
    split = split if site.layout != "separate" else set()
    for name, t in mapped.items():
        same = name in src and name not in split and src[name].shape == t.shape and torch.equal(src[name], t)
        (rec.copied if same else rec.reshaped).append(name)
    rec.created = [n for n in mixer.state_dict() if n not in mapped]
    rec.dropped = [n for n in src if n not in mapped]
    return rec


def _load_mapped(mixer: Mixer, mapped: dict[str, Tensor], m: Match) -> None:
    own = mixer.state_dict()
    where = f"layer {m.layer} ({m.path}): weight map '{m.weights}' for mixer '{m.mixer}'"
    unknown = [k for k in mapped if k not in own]
    if unknown:
        raise PlanError([("", f"{where} returned {unknown} which the mixer does not have (it has {list(own)})")])
    for k, t in mapped.items():
        if own[k].shape != t.shape:
            raise PlanError([("", f"{where} returned '{k}' of shape {tuple(t.shape)}; the mixer expects {tuple(own[k].shape)}")])
    mixer.load_state_dict(mapped, strict=False)
    # Verify what was copied: a map returning views or the wrong dtype must not pass unnoticed.
    now = mixer.state_dict()
    for k, t in mapped.items():
        if not torch.equal(now[k], t.to(now[k].dtype)):
            raise RuntimeError(f"{where}: '{k}' differs from the mapped tensor after loading")


def _keep_pretrained_dtypes(mixer: Mixer, src: dict[str, Tensor]) -> None:
    """Give the mixer's parameters that stand for a pretrained tensor of the same name that tensor's dtype.

    Models keep some tensors in fp32 whatever their dtype (HY-V4's sinks, its indexer's norm and weights
    projection), and compute in fp32 where they meet them: cast to the model's dtype, a kept layer would differ.
    """
    own = dict(mixer.named_parameters())
    for name, tensor in src.items():
        param = own.get(name)
        if param is not None and param.dtype != tensor.dtype:
            param.data = param.data.to(tensor.dtype)


def _probe(mixer: Mixer, m: Match, registry: Registry, ref: Tensor) -> None:
    """Run a 3-token forward through a new mixer (its weights mapped): a plugin returning the wrong shape, or a
    non-finite output (a NaN weight, a division by zero), is named here, not later as a NaN model saved."""
    hidden = mixer.site.dims.hidden_size
    gen = torch.Generator().manual_seed(0)
    x = (0.1 * torch.randn(1, 3, hidden, generator=gen)).to(device=ref.device, dtype=ref.dtype)
    was = mixer.training
    mixer.eval()
    try:
        with torch.no_grad():
            out = mixer.mix(x, MixContext(None, None, None, None, {}))
    except Exception as exc:  # noqa: BLE001 - any failure of a plugin's code is reported with its origin
        raise PlanError([(f"convert.{m.rule}.mixer", f"layer {m.layer}: mixer '{m.mixer}' "
                          f"({registry.origin('mixer', m.mixer)}) failed on a probe input [1, 3, {hidden}]: "
                          f"{type(exc).__name__}: {exc}")]) from None  # fmt: skip
    finally:
        mixer.train(was)
    if not isinstance(out, Tensor) or tuple(out.shape) != (1, 3, hidden):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise PlanError([(f"convert.{m.rule}.mixer", f"layer {m.layer}: mixer '{m.mixer}' "
                          f"({registry.origin('mixer', m.mixer)}) returned {got} for an input [1, 3, {hidden}]; "
                          f"a mixer must return [B, T, {hidden}]")])  # fmt: skip
    if out.device.type != "meta" and not bool(torch.isfinite(out).all()):
        raise PlanError([(f"convert.{m.rule}.mixer", f"layer {m.layer}: mixer '{m.mixer}' "
                          f"({registry.origin('mixer', m.mixer)}) returned non-finite values (NaN or inf) for a "
                          "finite probe input; check its options and the layer's weights")])  # fmt: skip


def apply_plan(model: nn.Module, plan: Plan, map_weights: bool = True) -> nn.Module:
    """Swap the attention modules ``plan`` selects for mixers, in place; returns ``model``.

    With ``map_weights=False`` only the structure is built (used by ``surgery.load``, which then loads saved
    weights). The model gets ``model.surgery`` (a ``SurgeryInfo``) and a hook that records the padding mask.
    """
    registry = plan.registry
    sites = {s.layer_idx: s for s in find_attention(model)}
    shared = SharedState()
    manifest = []
    for m, rule in match(plan, list(sites.values()), num_layers(model)):
        site = sites[m.layer]
        old = model.get_submodule(site.path)
        # The output projection's dtype, not the module's first parameter's: that may be an fp32 extra (HY-V4's
        # sinks come first) in a bf16 model.
        ref = getattr(old, site.out_name).weight
        mixer_cls = registry.mixer(m.mixer)
        with torch.device(ref.device):
            mixer = mixer_cls(site, m.options, model.config)
        mixer.to(dtype=ref.dtype)
        src = read_weights(old, site)
        _keep_pretrained_dtypes(mixer, src)
        if map_weights:
            misfit = _misfit(m, mixer, registry)
            if misfit:
                raise PlanError(misfit)
            mapped = registry.weight_map(m.weights)(rule.weight_options)(src, mixer)
            _load_mapped(mixer, mapped, m)
            _probe(mixer, m, registry, ref)
            manifest.append(_record(m, site, src, mapped, mixer))
        else:
            manifest.append(LayerRecord(m.layer, m.path, m.module_class, m.mixer, m.weights,
                                        m.options.model_dump(mode="json")))  # fmt: skip
        mixer.shared = shared
        mixer.train(old.training)
        parent_path, _, child = site.path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, mixer)
    install_padding_hook(model, shared)
    model.surgery = SurgeryInfo(plan=plan, manifest=manifest, shared=shared)
    return model


def convert(plan: Plan, model: nn.Module | None = None) -> nn.Module:
    """Convert ``model`` (or the plan's model, loaded from ``plan.model``) as the plan says.

    Returns the converted model (the same object when one is given). ``model.surgery.manifest`` lists, per
    layer, the tensors copied, reshaped, created new and dropped.
    """
    if getattr(model, "surgery", None) is not None:
        raise ValueError("this model was already converted; convert the original model")
    model = model if model is not None else load_model(plan)
    with torch.no_grad():
        return apply_plan(model, plan, map_weights=True)
