"""The plan file: YAML validated with pydantic v2 in one pass, names resolved against the plugin registry.

``load_plan`` validates the plan with the registry in pydantic's validation context; every registered name with its
options (a rule's mixer and weight map, a stage, a nested recurrent mixer) is resolved inside that one validation
by ``surgery.options.resolve``. The plan keeps the registry it was validated against (``Plan.registry``): convert,
check, recover and evaluate read it from there. Every error carries its location (``convert.0.options.gate_rank:
...``); all errors of a plan are reported together. Model-dependent checks (layers in range, overlapping rules,
dimensions) happen in ``surgery.convert.check``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (Field, NonNegativeInt, PositiveInt, PrivateAttr, SerializeAsAny, ValidationError, ValidationInfo,
                      field_validator, model_validator)  # fmt: skip

from surgery.errors import PlanError
from surgery.evaluate import EvalSpec
from surgery.options import Options, fail, registry_of, relocate, resolve, set_default_registry
from surgery.recovery.spec import RecoverSpec
from surgery.registry import Registry, load_registry

PLAN_VERSION = 2
#: Version 2 spells a nested mixer one way, ``recurrent: {mixer, options}``; version 1 plans are migrated on load
#: (``migrate``), and a version 2 plan with the old keys gets a located error naming the new spelling.
MAX_PLAN_BYTES = 1 << 20  # a plan is a few hundred bytes; anything this large is a mistake (or an attack)
MAX_LAYER_INDEX = 100_000  # beyond any model: a range past it is a typo, and must not allocate its list
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class Every(Options):
    """Select layers ``offset, offset + every, offset + 2*every, ...``."""

    every: PositiveInt
    offset: NonNegativeInt = 0


LayerSelector = Union[Literal["all"], str, int, list[Union[int, str]], Every]


def parse_range(item: int | str) -> list[int]:
    """``5`` -> [5]; ``"2-4"`` -> [2, 3, 4]. Raises ValueError for anything else."""
    if isinstance(item, bool):  # YAML's true/false are ints to Python: `layers: true` must not mean layer 1
        raise ValueError(f"layers: {str(item).lower()} is not a layer selector; write 'all', 'A-B', an index or a list")
    if isinstance(item, int):
        if item < 0:
            raise ValueError(f"layer index {item} is negative")
        if item > MAX_LAYER_INDEX:
            raise ValueError(f"layer index {item} is beyond any model (at most {MAX_LAYER_INDEX})")
        return [item]
    m = _RANGE.match(item)
    if not m:
        raise ValueError(f"bad layer range '{item}': write 'all', 'A-B', an index, a list of those, or {{every: N, offset: M}}")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if hi < lo:
        raise ValueError(f"bad layer range '{item}': end {hi} is before start {lo}")
    if hi > MAX_LAYER_INDEX:
        raise ValueError(f"bad layer range '{item}': {hi} is beyond any model (at most {MAX_LAYER_INDEX})")
    return list(range(lo, hi + 1))


def select_layers(selector: LayerSelector, n_layers: int) -> list[int]:
    """Layer indices a selector names for a model with ``n_layers`` layers (indices may exceed the model)."""
    if selector == "all":
        return list(range(n_layers))
    if isinstance(selector, Every):
        return list(range(selector.offset, n_layers, selector.every))
    items = selector if isinstance(selector, list) else [selector]
    out: list[int] = []
    for item in items:
        out.extend(parse_range(item))
    return sorted(set(out))


class Rule(Options):
    """One line of ``convert:``: which layers get which mixer and which weight mapping.

    Validated, ``options`` is an instance of the mixer's own ``Options`` class and ``weight_options`` of the weight
    map's (every default filled in), and ``weights`` names the map (the mixer's default when the plan names none).
    """

    layers: LayerSelector = "all"
    mixer: str
    options: SerializeAsAny[Options] | dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None  # None: the mixer's default weight map
    weight_options: SerializeAsAny[Options] | dict[str, Any] = Field(default_factory=dict)

    @field_validator("layers", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, list) and any(isinstance(x, bool) for x in v)):
            raise ValueError("true/false is not a layer selector; write 'all', 'A-B', an index or a list of those")
        return v

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v: LayerSelector) -> LayerSelector:
        if v != "all" and not isinstance(v, Every):
            for item in v if isinstance(v, list) else [v]:
                parse_range(item)
            if isinstance(v, list) and not v:
                raise ValueError("empty layer list")
        return v


    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> Rule:
        errors = []
        try:
            mixer, options = resolve("mixer", self.mixer, self.options, info, name_at=("mixer",),
                                     options_at=("options",))  # fmt: skip
            object.__setattr__(self, "options", options)  # in place: an after-validator returns self
            weights = self.weights or mixer.default_weights_for(options)
            object.__setattr__(self, "weights", weights)
        except ValidationError as err:
            errors += relocate(err)
            weights = self.weights
        if weights is not None:
            try:
                _, weight_options = resolve("weight map", weights, self.weight_options, info, name_at=("weights",),
                                            options_at=("weight_options",))  # fmt: skip
                object.__setattr__(self, "weight_options", weight_options)
            except ValidationError as err:
                errors += relocate(err)
        if errors:
            fail(errors, "Rule")
        return self


class Plan(Options):
    """A whole plan. ``load_plan`` builds it: validated against a registry, which it keeps (``registry``)."""

    version: int
    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    output: str | None = None
    convert: list[Rule] = Field(min_length=1)
    recover: RecoverSpec | None = None
    eval: EvalSpec | None = None
    _registry: Registry | None = PrivateAttr(None)

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str) -> str:
        if _is_local_path(v) and not Path(v).expanduser().exists():
            raise ValueError(f"model path '{v}' does not exist")
        return v

    @model_validator(mode="after")
    def _keep_registry(self, info: ValidationInfo) -> Plan:
        self._registry = registry_of(info)
        return self

    @property
    def registry(self) -> Registry:
        """The plugin registry this plan was validated against: its mixers, weight maps and stages."""
        if self._registry is None:  # only a plan made without validation (model_construct) lacks one
            raise PlanError("this plan was not validated: build it with surgery.load_plan")
        return self._registry

    @field_validator("version")
    @classmethod
    def _check_version(cls, v: int) -> int:
        if v != PLAN_VERSION:
            raise ValueError(f"plan version {v} is not supported; this surgery reads version {PLAN_VERSION} (and "
                             f"migrates version 1)")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    """``(location, message)`` pairs of a validation error, as ``PlanError`` prints them."""
    problems = []
    for e in err.errors():
        # Union types add the member name to the location ("layers.list[union[int,str]].0"); drop it.
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in ("Every", "str", "int"))))
        problems.append((".".join(map(str, loc)), e["msg"].removeprefix("Value error, ")))
    # A selector that failed every member of the union reports once per member; keep the first per location.
    seen, unique = set(), []
    for loc, msg in problems:
        if loc not in seen:
            seen.add(loc)
            unique.append((loc, msg))
    return unique


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML itself keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merge key (<<: *base): its keys are defaults the mapping's own keys may override
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read(source: str | Path | dict) -> tuple[dict, str | None]:
    if isinstance(source, dict):
        return source, None
    path = Path(source)
    if not path.is_file():
        raise PlanError([("", f"plan file '{path}' does not exist")])
    size = path.stat().st_size
    if size > MAX_PLAN_BYTES:
        raise PlanError([("", f"the file is {size / 2**20:.1f} MiB; a plan is a small YAML file (at most "
                              f"{MAX_PLAN_BYTES // 2**20} MiB)")], str(path))  # fmt: skip
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise PlanError([("", f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} on line {line}")], str(path)) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise PlanError([("", "the YAML is nested too deeply to be a plan")], str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise PlanError([("", f"broken YAML: {where}{getattr(exc, 'problem', exc)}")], str(path)) from None
    if not isinstance(data, dict):
        raise PlanError([("", "a plan is a YAML mapping with keys version, model, convert, ...")], str(path))
    return data, str(path)


def _is_local_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def default_registry() -> Registry:
    """The registry of a plan loaded without one: the built-ins and every installed plugin.

    The one place a default registry is built; the plan keeps it, so a run uses this one registry throughout.
    """
    return load_registry()


# An Options class with a nested name validated on its own (``LigerAttention.Options()``) resolves it here.
set_default_registry(default_registry)


def load_plan(source: str | Path | dict, registry: Registry | None = None) -> Plan:
    """Parse and validate a plan (YAML path or dict); resolve mixers, weight maps, stages and their options.

    Returns a plan whose rules name their weight map explicitly and whose options include every default, so that
    the resolved plan saved with a model rebuilds it exactly; it keeps ``registry`` (default: ``default_registry()``)
    as ``plan.registry``. Raises ``PlanError`` listing every problem.
    """
    data, where = _read(source)
    registry = registry if registry is not None else default_registry()
    data = migrate(data, registry)
    try:
        return Plan.model_validate(data, context={"registry": registry})
    except ValidationError as err:
        raise PlanError(_problems(err), where) from None


def migrate(data: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """A version 1 plan (a saved model's too) in version 2's spelling; any other plan as it is.

    Version 1 also accepted ``recurrence: NAME`` with ``recurrence_options: {...}`` (MoM) and a recurrent branch's
    options beside the mixer's own (``{recurrent: gsa, num_slots: 8}``, Liger Attention). Both become ``recurrent:
    {mixer: NAME, options: {...}}``. Keys neither the mixer nor its branch knows stay where they are, for the
    validation to locate.
    """
    if data.get("version") != 1 or not isinstance(data.get("convert"), list):
        return data
    rules = []
    for rule in data["convert"]:
        opts = rule.get("options") if isinstance(rule, dict) else None
        cls = registry.mixers.get(rule.get("mixer")) if isinstance(rule, dict) and isinstance(rule.get("mixer"), str) \
            else None  # fmt: skip
        if not isinstance(opts, dict) or cls is None or "recurrent" not in cls.Options.model_fields:
            rules.append(rule)
            continue
        opts = dict(opts)
        if "recurrence" in opts or "recurrence_options" in opts:
            opts["recurrent"] = {"mixer": opts.pop("recurrence", "gla"), "options": opts.pop("recurrence_options", {})}
        branch = opts.get("recurrent", "gla")
        branch = {"mixer": branch} if isinstance(branch, str) else branch
        inner = registry.mixers.get(branch.get("mixer")) if isinstance(branch, dict) else None
        if inner is not None:
            loose = {k: opts.pop(k) for k in list(opts)
                     if k not in cls.Options.model_fields and k in inner.Options.model_fields}  # fmt: skip
            if loose:
                branch = {**branch, "options": {**(branch.get("options") or {}), **loose}}
            opts["recurrent"] = branch
        rules.append({**rule, "options": opts})
    return {**data, "version": PLAN_VERSION, "convert": rules}


def plan_json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON Schema of the plan file, for editors: every registered mixer's, weight map's and stage's options.

    A rule is one of the mixers (``if mixer == NAME then options: NAME's Options``); ``recover.stages`` maps each
    registered stage to its options.
    """
    registry = registry if registry is not None else default_registry()
    schema = Plan.model_json_schema()
    defs = schema.setdefault("$defs", {})

    def ref(cls: type, name: str) -> dict[str, str]:
        sub = cls.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        defs[name] = sub
        return {"$ref": f"#/$defs/{name}"}

    rule_options = [
        {"if": {"properties": {"mixer": {"const": n}}, "required": ["mixer"]},
         "then": {"properties": {"options": ref(c.Options, f"mixer.{n}")}}}
        for n, c in sorted(registry.mixers.items())
    ]  # fmt: skip
    rule = defs["Rule"]
    rule["properties"]["mixer"] = {"enum": sorted(registry.mixers), "description": "a registered mixer"}
    rule["properties"]["weights"] = {"enum": sorted(registry.weight_maps), "description": "a registered weight map"}
    rule["allOf"] = rule_options
    stages = {n: ref(c.Options, f"stage.{n}") for n, c in sorted(registry.stages.items())}
    recover = defs.get("RecoverSpec", {})
    recover.setdefault("properties", {})["stages"] = {
        "description": "stages in order: a list of names, or name -> options",
        "anyOf": [{"type": "array", "items": {"enum": sorted(stages)}},
                  {"type": "object", "properties": stages, "additionalProperties": False}],
    }  # fmt: skip
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "surgery plan"
    return schema
