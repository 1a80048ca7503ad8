"""Build a fresh plugin registry: built-ins, the ``surgery`` entry points, and extras (for tests).

Nothing is created at import time. ``load_registry`` returns a ``Registry`` facade so that the rest of the code
never calls ``pm.hook.*`` itself. Set ``SURGERY_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry points.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from surgery import hookspecs
from surgery.errors import PluginError, UnknownNameError
from surgery.mixer import NAME_RE, Mixer, WeightMap
from surgery.options import did_you_mean
from surgery.recovery.stage import Stage
from surgery.recurrent import RecurrentMixer

#: Built-in plugin modules, registered exactly like third-party plugins.
DEFAULT_PLUGINS = (
    "surgery.plugins.softmax",
    "surgery.plugins.weight_maps",
    "surgery.plugins.gla",
    "surgery.plugins.hgrn2",
    "surgery.plugins.gsa",
    "surgery.plugins.liger",
    "surgery.plugins.swa",
    "surgery.plugins.mom",
    "surgery.plugins.pooled_key_gate",
    "surgery.recovery.stages.attention_transfer",
    "surgery.recovery.stages.lora",
)
ENTRY_POINT_GROUP = "surgery"
AUTOLOAD_ENV = "SURGERY_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin: where it comes from and what it provides."""

    plugin: str
    distribution: str
    version: str
    mixers: tuple[str, ...]
    weight_maps: tuple[str, ...]
    stages: tuple[str, ...] = ()
    error: str | None = None  # set when the plugin failed to load (``load_registry(strict=False)``)


class Registry:
    """Read-only view of the mixers, weight maps and recovery stages provided by the registered plugins.

    With ``strict=False`` a plugin that breaks the contract is left out and kept in ``broken`` (name -> error)
    instead of failing the whole registry (``surgery plugins list`` shows it).
    """

    def __init__(
        self, pm: pluggy.PluginManager, sources: dict[str, tuple[str, str]], broken: dict[str, str] | None = None,
        strict: bool = True,
    ) -> None:  # fmt: skip
        self._pm = pm
        self._sources = sources  # plugin name -> (distribution, version)
        self.mixers: dict[str, type[Mixer]] = {}
        self.weight_maps: dict[str, type[WeightMap]] = {}
        self.stages: dict[str, type[Stage]] = {}
        self.broken: dict[str, str] = dict(broken or {})
        self._owner: dict[tuple[str, str], str] = {}
        for plugin_name, plugin in pm.list_name_plugin():
            if plugin is hookspecs:
                continue
            try:
                self._register(plugin_name, plugin)
            except PluginError as exc:
                if strict:
                    raise
                self.broken[plugin_name] = str(exc)
                for key in [k for k, owner in self._owner.items() if owner == plugin_name]:
                    del self._table(key[0])[key[1]], self._owner[key]

    def __copy__(self) -> Registry:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Registry:
        # Shared, never copied: a copied plan or model (FSDP's skeleton, a run's converted copy of the base) keeps
        # the registry it was validated against, and a registry holds plugin modules, which cannot be copied.
        return self

    def _table(self, kind: str) -> dict[str, Any]:
        return {"mixer": self.mixers, "weight map": self.weight_maps, "stage": self.stages}[kind]

    def table(self, kind: str) -> dict[str, type]:
        """The registered classes of one kind by name: ``mixer``, ``recurrent mixer`` (the mixers a parent such as
        Liger Attention or MoM can run as its recurrence), ``weight map`` or ``stage``. Plans resolve names here
        (``surgery.options.resolve``)."""
        if kind == "recurrent mixer":
            return {n: c for n, c in self.mixers.items() if issubclass(c, RecurrentMixer)}
        return dict(self._table(kind))

    def _register(self, plugin_name: str, plugin: object) -> None:
        for kind, hook, base in (
            ("mixer", "surgery_mixers", Mixer),
            ("weight map", "surgery_weight_maps", WeightMap),
            ("stage", "surgery_stages", Stage),
        ):
            impl = getattr(plugin, hook, None)
            if impl is None:
                continue
            try:
                classes = list(impl() or [])
            except (Exception, SystemExit) as exc:  # a broken plugin is named, never the end of the program
                raise PluginError(f"plugin {self._describe(plugin_name)} raised in {hook}(): {exc!r}") from exc
            for cls in classes:
                self._add(kind, plugin_name, cls, base, self._table(kind))

    def _describe(self, plugin_name: str) -> str:
        dist, version = self._sources.get(plugin_name, ("surgery", ""))
        return f"'{plugin_name}' (distribution {dist} {version})".replace(" )", ")")

    def _add(self, kind: str, plugin_name: str, cls: Any, base: type, table: dict) -> None:
        who = self._describe(plugin_name)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"plugin {who} returned {cls!r} as a {kind}; expected a subclass of {base.__name__}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise PluginError(f"plugin {who}: {kind} {cls.__name__} has name {name!r}; names must match {NAME_RE.pattern}")
        if kind == "mixer" and not isinstance(getattr(cls, "default_weights", None), str):
            raise PluginError(f"plugin {who}: mixer {cls.__name__} sets no default_weights (the weight map plans get "
                              "when they name none, e.g. 'copy_qkvo')")  # fmt: skip
        if name in table:
            other = self._describe(self._owner[(kind, name)])
            raise PluginError(f"duplicate {kind} name '{name}': provided by plugin {other} and by plugin {who}")
        table[name] = cls
        self._owner[(kind, name)] = plugin_name

    def mixer(self, name: str) -> type[Mixer]:
        if name not in self.mixers:
            raise UnknownNameError(f"unknown mixer '{name}'{did_you_mean(name, self.mixers)}")
        return self.mixers[name]

    def weight_map(self, name: str) -> type[WeightMap]:
        if name not in self.weight_maps:
            raise UnknownNameError(f"unknown weight map '{name}'{did_you_mean(name, self.weight_maps)}")
        return self.weight_maps[name]

    def origin(self, kind: str, name: str) -> str:
        """``plugin 'x' (distribution d v)`` for a registered mixer, weight map or stage."""
        return "plugin " + self._describe(self._owner[(kind, name)])

    def stage(self, name: str) -> type[Stage]:
        if name not in self.stages:
            raise UnknownNameError(f"unknown stage '{name}'{did_you_mean(name, self.stages)}")
        return self.stages[name]

    def plugins(self) -> list[PluginInfo]:
        rows = []
        for plugin_name, _plugin in self._pm.list_name_plugin():
            if _plugin is hookspecs:
                continue
            dist, version = self._sources.get(plugin_name, ("surgery", _own_version()))
            rows.append(
                PluginInfo(
                    plugin=plugin_name,
                    distribution=dist,
                    version=version,
                    mixers=tuple(n for (k, n), p in self._owner.items() if k == "mixer" and p == plugin_name),
                    weight_maps=tuple(n for (k, n), p in self._owner.items() if k == "weight map" and p == plugin_name),
                    stages=tuple(n for (k, n), p in self._owner.items() if k == "stage" and p == plugin_name),
                    error=self.broken.get(plugin_name),
                )
            )
        for name, error in self.broken.items():
            if name not in {r.plugin for r in rows}:
                dist, version = self._sources.get(name, ("?", "?"))
                rows.append(PluginInfo(name, dist, version, (), (), (), error))
        return rows


def _own_version() -> str:
    try:
        return md.version("surgery")
    except md.PackageNotFoundError:
        return "0+unknown"


def load_registry(
    autoload: bool | None = None, extra: Iterable[ModuleType | object] = (), strict: bool = True
) -> Registry:
    """A fresh registry: built-ins, then ``extra`` plugins, then entry points (unless disabled).

    Args:
        autoload: load ``surgery`` entry points; default: unless ``SURGERY_DISABLE_PLUGIN_AUTOLOAD`` is set.
        extra: plugin modules or objects to register (tests use this).
        strict: raise ``PluginError`` for a broken plugin; False leaves it out and records it in ``broken``.
    """
    broken: dict[str, str] = {}
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    sources: dict[str, tuple[str, str]] = {}
    for modname in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
        sources[modname] = ("surgery", _own_version())
    for plugin in extra:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.register(plugin, name=name)
        sources[name] = ("(extra)", "")
    if autoload is None:
        autoload = not os.environ.get(AUTOLOAD_ENV)
    if autoload:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            try:
                # SystemExit too: a plugin calling sys.exit() at import must not end every command silently.
                plugin = ep.load()
                if pm.is_registered(plugin):
                    continue
                pm.register(plugin, name=ep.name)
            except (Exception, SystemExit) as exc:
                message = f"plugin '{ep.name}' (distribution {dist} {version}) failed to load from '{ep.value}': {exc!r}"
                if strict:
                    raise PluginError(message) from None
                broken[ep.name] = message
                sources[ep.name] = (dist, version)
                continue
            sources[ep.name] = (dist, version)
    try:
        pm.check_pending()
    except Exception as exc:  # pluggy's PluginValidationError: a hook no spec declares
        if strict:
            raise PluginError(f"a plugin implements an unknown hook: {exc}") from None
        broken["(hooks)"] = str(exc)
    return Registry(pm, sources, broken, strict)


def catalogue(registry: Registry) -> dict[str, Any]:
    """The catalogue of a registry's built-in plugins: name, kind, description, options with defaults.

    Mixers show their default weight map, weight maps what they need of a mixer, stages which stages they precede.

    ``registry.yaml`` at the repository root is this, for the built-ins, so reviewers see what ships.
    """

    def options(cls: type) -> dict[str, Any]:
        out = {}
        try:  # the defaults as validated (a nested mixer's name resolved into its options)
            validated = cls.Options.model_validate({}, context={"registry": registry})
        except ValueError:  # an option without a default
            validated = None
        for name, f in cls.Options.model_fields.items():
            default = None if f.is_required() else f.get_default(call_default_factory=True)
            if validated is not None and f.validate_default:
                default = getattr(validated, name)
            if hasattr(default, "model_dump"):
                default = default.model_dump(mode="json")
            ann = f.annotation
            kind = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            out[name] = {"default": default, "type": kind}
        return out

    builtin = {name for name, (dist, _) in registry._sources.items() if dist == "surgery"}
    entries = []
    for (kind, name), owner in sorted(registry._owner.items()):
        if owner not in builtin:
            continue
        cls = registry._table(kind)[name]
        entry: dict[str, Any] = {"name": name, "kind": kind.replace(" ", "_"), "plugin": owner,
                                 "description": cls.description, "options": options(cls)}  # fmt: skip
        if kind == "mixer":
            entry["default_weights"] = cls.default_weights
            entry["recurrent"] = issubclass(cls, RecurrentMixer)
        elif kind == "weight map":
            entry["needs"] = dict(cls.needs)
        else:
            entry["before"] = list(cls.before)
        entries.append(entry)
    return {"generated_by": "surgery plugins catalogue > registry.yaml", "plugins": entries}
