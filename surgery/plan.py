"""The plan file: YAML validated with pydantic v2, names resolved against the plugin registry.

Every error carries its location (``convert.0.options.gate_rank: ...``); all errors of a plan are reported together.
Model-dependent checks (layers in range, overlapping rules, dimensions) happen in ``surgery.convert.check``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import Field, NonNegativeInt, PositiveInt, SerializeAsAny, ValidationError, field_validator

from surgery.errors import PlanError
from surgery.evaluate import EvalSpec
from surgery.mixer import Options
from surgery.recovery.spec import RecoverSpec
from surgery.registry import Registry, did_you_mean, load_registry

PLAN_VERSION = 1
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

    After ``load_plan``, ``options`` is an instance of the mixer's own ``Options`` class and ``weight_options`` of
    the weight map's (validated once, every default filled in); before, they are the plan's dicts.
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


class Plan(Options):
    """A whole plan. Build it with ``load_plan`` so names and options are resolved against the registry."""

    version: int
    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    output: str | None = None
    convert: list[Rule] = Field(min_length=1)
    recover: RecoverSpec | None = None
    eval: EvalSpec | None = None

    @field_validator("version")
    @classmethod
    def _check_version(cls, v: int) -> int:
        if v != PLAN_VERSION:
            raise ValueError(f"plan version {v} is not supported; this surgery reads version {PLAN_VERSION}")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    @property
    def typed(self) -> bool:
        """Whether every rule's options are validated ``Options`` objects (a plan from ``load_plan``)."""
        return all(isinstance(r.options, Options) and isinstance(r.weight_options, Options) for r in self.convert)


def _pydantic_problems(err: ValidationError, prefix: tuple = (), allowed: dict[str, list[str]] | None = None) -> list:
    problems = []
    for e in err.errors():
        loc = tuple(prefix) + tuple(e["loc"])
        # Union types add the member name to the location ("layers.list[union[int,str]].0"); drop it.
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("Every", "str", "int"))))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            known = (allowed or {}).get(".".join(map(str, loc[:-1])), [])
            msg = f"unknown key '{key}'{did_you_mean(key, known)}"
        problems.append((".".join(map(str, loc)), msg))
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
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise PlanError([("", f"broken YAML: {where}{getattr(exc, 'problem', exc)}")], str(path)) from None
    if not isinstance(data, dict):
        raise PlanError([("", "a plan is a YAML mapping with keys version, model, convert, ...")], str(path))
    return data, str(path)


def _is_local_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def load_plan(source: str | Path | dict, registry: Registry | None = None) -> Plan:
    """Parse and validate a plan (YAML path or dict); resolve mixers, weight maps and their options.

    Returns a plan whose rules name their weight map explicitly and whose options include every default, so that
    the resolved plan saved with a model rebuilds it exactly. Raises ``PlanError`` listing every problem.
    """
    data, where = _read(source)
    registry = registry if registry is not None else load_registry()
    allowed = {"": list(Plan.model_fields), "recover": list(RecoverSpec.model_fields),
               "eval": list(EvalSpec.model_fields)}  # fmt: skip
    for i in range(len(data.get("convert") or []) if isinstance(data.get("convert"), list) else 0):
        allowed[f"convert.{i}"] = list(Rule.model_fields)
    try:
        plan = Plan.model_validate(data, context={"registry": registry})
    except ValidationError as err:
        raise PlanError(_pydantic_problems(err, allowed=allowed), where) from None

    problems: list[tuple[str, str]] = []
    if _is_local_path(plan.model) and not Path(plan.model).expanduser().exists():
        problems.append(("model", f"model path '{plan.model}' does not exist"))
    rules = []
    for i, rule in enumerate(plan.convert):
        loc = f"convert.{i}"
        if rule.mixer not in registry.mixers:
            problems.append((f"{loc}.mixer", f"unknown mixer '{rule.mixer}'{did_you_mean(rule.mixer, registry.mixers)}"))
            rules.append(rule)
            continue
        mixer_cls = registry.mixers[rule.mixer]
        options: Any = rule.options
        try:
            raw = options.model_dump() if isinstance(options, Options) else options
            options = mixer_cls.Options.model_validate(raw, context={"registry": registry})
        except ValidationError as err:
            known = {"": list(mixer_cls.Options.model_fields)}
            problems += _pydantic_problems(err, (loc, "options"), allowed={f"{loc}.options": known[""]})
        typed = isinstance(options, mixer_cls.Options)
        weights = rule.weights or (mixer_cls.default_weights_for(options) if typed else mixer_cls.default_weights)
        weight_options: Any = rule.weight_options
        if weights not in registry.weight_maps:
            hint = did_you_mean(weights, registry.weight_maps)
            problems.append((f"{loc}.weights", f"unknown weight map '{weights}'{hint}"))
        else:
            wm = registry.weight_maps[weights]
            try:
                raw = weight_options.model_dump() if isinstance(weight_options, Options) else weight_options
                weight_options = wm.Options.model_validate(raw, context={"registry": registry})
            except ValidationError as err:
                problems += _pydantic_problems(
                    err, (loc, "weight_options"), allowed={f"{loc}.weight_options": list(wm.Options.model_fields)}
                )
        rules.append(rule.model_copy(update={"options": options, "weights": weights, "weight_options": weight_options}))
    if problems:
        raise PlanError(problems, where)
    return plan.model_copy(update={"convert": rules})


def plan_json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON Schema of the plan file, for editors: every registered mixer's, weight map's and stage's options.

    A rule is one of the mixers (``if mixer == NAME then options: NAME's Options``); ``recover.stages`` maps each
    registered stage to its options.
    """
    registry = registry if registry is not None else load_registry()
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
