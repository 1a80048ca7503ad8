"""What a benchmark converts: a mixer name, a rule, or an example plan, each a row of its table.

A conversion is given on the command line (``--mixers``) as one of:

- a registered mixer name (``gla``): every layer, with the benchmark's default options for that mixer;
- a rule as inline YAML/JSON, ``{mixer: liger_attention, options: {window: 64, memory: 512}}`` (``layers`` defaults
  to all), or a list of rules;
- a path to a YAML/JSON file holding a rule, a list of rules, or a plan (its ``convert:`` rules; its model, dtype,
  output and other sections are ignored: the benchmark brings its own model);

optionally prefixed by a row label, ``LABEL=SPEC`` (``memory=examples/demo.yaml``). Without one the label is the
mixer name, the file's stem, or the mixer name plus the options (``liger_attention{window:64}``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: The main job's constant-memory recipe (window 64, 4 sinks, a 512-pair memory, ``w_rec: 0``), read from the plan
#: that runs it, so the benchmark row and the main job cannot drift apart.
MEMORY = f"memory={(ROOT / 'examples' / 'demo.yaml').relative_to(ROOT)}"

_LABEL = re.compile(r"^([A-Za-z0-9_./-]+)=(.+)$", re.S)


@dataclass(frozen=True)
class Conversion:
    """A benchmark row: its ``label`` and the plan rules that convert the model (``version`` of their spelling)."""

    label: str
    rules: list[dict[str, Any]] = field(hash=False)
    version: int = 2

    def plan(self) -> dict[str, Any]:
        """The plan dict for ``surgery.load_plan`` (the model field is unused: ``surgery.convert`` gets a model)."""
        return {"version": self.version, "model": "benchmark/unused", "convert": self.rules}


def _compact(options: dict[str, Any]) -> str:
    return json.dumps(options, separators=(",", ":"), sort_keys=True).replace('"', "")


def parse(spec: str, defaults: dict[str, dict[str, Any]] | None = None, registry: Any = None) -> Conversion:
    """One ``--mixers`` entry as a ``Conversion`` (see the module docstring).

    Args:
        defaults: per mixer name, the options a bare name gets (a benchmark's own defaults).
        registry: to tell a mixer name from a file name; default: the built-ins.

    Raises:
        SystemExit: the spec is neither a mixer name, a rule, nor a readable file; the message says which.
    """
    from surgery.registry import load_registry

    registry = registry if registry is not None else load_registry(autoload=False)
    label = None
    m = _LABEL.match(spec)
    if m and not spec.lstrip().startswith(("{", "[")):
        label, spec = m.group(1), m.group(2)
    spec = spec.strip()
    if spec in registry.mixers:
        options = dict((defaults or {}).get(spec, {}))
        return Conversion(label or spec, [{"layers": "all", "mixer": spec, "options": options}])
    path = Path(spec) if not spec.startswith(("{", "[")) else None
    if path is not None and not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        path = ROOT / path
    if path is not None and path.is_file():
        data, stem = yaml.safe_load(path.read_text()), path.stem
    elif path is not None and not any(c in spec for c in ":{}[]"):
        raise SystemExit(f"conversion {spec!r}: not a registered mixer ({', '.join(sorted(registry.mixers))}), "
                         "not a file, not a rule")  # fmt: skip
    else:
        try:
            data, stem = yaml.safe_load(spec), None
        except yaml.YAMLError as exc:
            raise SystemExit(f"conversion {spec!r}: not a registered mixer, file or YAML/JSON rule ({exc})") from exc
    version = 2
    if isinstance(data, dict) and "convert" in data:  # a plan
        version, data = int(data.get("version", 2)), data["convert"]
    rules = data if isinstance(data, list) else [data]
    if not rules or not all(isinstance(r, dict) and "mixer" in r for r in rules):
        raise SystemExit(f"conversion {spec!r}: a rule is a mapping with a 'mixer' key ({{mixer: NAME, options: "
                         "{...}}), a list of them, or a plan with convert:")  # fmt: skip
    rules = [{"layers": "all", **r} if "layers" not in r and "match" not in r else dict(r) for r in rules]
    if label is None:
        first = rules[0]
        label = stem or (first["mixer"] + (_compact(first["options"]) if first.get("options") else ""))
    return Conversion(label, rules, version)


def parse_all(specs: list[str], defaults: dict[str, dict[str, Any]] | None = None) -> list[Conversion]:
    """``parse`` for each spec; labels must be unique (they name the rows)."""
    out = [parse(s, defaults) for s in specs]
    labels = [c.label for c in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise SystemExit(f"conversions {dup} appear twice: give them labels, LABEL=SPEC")
    return out
