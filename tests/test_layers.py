"""The house: every module of ``surgery/`` sits in a room (DESIGN.md, "Rooms"), imports only rooms below its own (or
its own room), and no import circle exists, counting lazy imports inside functions and ``TYPE_CHECKING`` blocks too.

Imports are read with ``ast``, so nothing is executed. A parent package's ``__init__`` that Python runs on the way
to a submodule is not an edge: only what a module's own source names is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "surgery"

#: Rooms from the bottom up, as (room, module prefixes). A module belongs to the room of its longest matching prefix.
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("surgery.errors",)),
    ("options", ("surgery.options",)),
    ("light contracts", ("surgery.hookspecs", "surgery.recovery.stage")),
    ("path rules", ("surgery.outputs", "surgery.artifacts_fs", "surgery.task_code")),
    ("sites", ("surgery.sites",)),
    ("kernels", ("surgery.kernels",)),
    ("caches", ("surgery.cache",)),
    ("contracts", ("surgery.mixer", "surgery.recurrent", "surgery.window", "surgery.retrieval",
                   "surgery.retrieval_batched")),
    ("registry", ("surgery.registry",)),
    ("plugins", ("surgery.plugins",)),
    # The plan's sections that live beside the code that reads them: recover's and eval's specs. evaluate imports
    # only options at module level (lm-eval loads inside), so the plan may read its EvalSpec.
    ("plan sections", ("surgery.recovery.spec", "surgery.evaluate")),
    ("plan", ("surgery.plan",)),
    ("convert", ("surgery.convert", "surgery.static_cache")),
    ("recovery", ("surgery.recovery",)),
    ("saved models", ("surgery.artifacts", "surgery.base")),
    ("verbs", ("surgery.generate", "surgery.select", "surgery.card", "surgery.lm_eval_cli")),
    ("pipeline", ("surgery.pipeline",)),
    ("api", ("surgery", "surgery.testing")),
    ("cli", ("surgery.cli", "surgery.demo")),
]


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


def room(module: str) -> int:
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(ROOMS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)  # fmt: skip
    assert best is not None, f"{module} is in no room: add it to ROOMS (and to DESIGN.md's table)"
    return best[1]


def _target(module: str, name: str) -> str | None:
    """The module of ours that ``name`` refers to (a module, or the module a name is imported from)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name if name and name != module else None


def imports(module: str) -> set[str]:
    """Every module of ours that ``module``'s source imports, wherever the import statement stands."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] == "surgery":
                target = _target(module, name)
                if target is not None:
                    out.add(target)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_room() -> None:
    for module in MODULES:
        room(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_runs_back_up(module: str) -> None:
    mine = room(module)
    upward = [f"{t} ({ROOMS[room(t)][0]})" for t in sorted(GRAPH[module]) if room(t) > mine]
    assert not upward, f"{module} ({ROOMS[mine][0]}) imports a room above it: {', '.join(upward)}"


def test_no_import_circle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_light_modules_stay_light() -> None:
    """errors imports nothing; options only pydantic; the stage contract only options (and errors)."""
    assert GRAPH["surgery.errors"] == set()
    assert GRAPH["surgery.options"] == set()
    assert GRAPH["surgery.recovery.stage"] <= {"surgery.options", "surgery.errors"}
    assert GRAPH["surgery.hookspecs"] == set()
    source = MODULES["surgery.options"].read_text()
    assert "torch" not in {n.split(".")[0] for n in _third_party(source)}


def _third_party(source: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
    return out


def test_the_core_names_no_plugin_and_no_demo() -> None:
    core = [m for m in MODULES if room(m) < room("surgery.cli") and not m.startswith(("surgery.plugins",
            "surgery.recovery.stages"))]  # fmt: skip
    for m in core:
        bad = {t for t in GRAPH[m] if t.startswith(("surgery.plugins", "surgery.demo"))}
        assert not bad, f"{m} imports {bad}"
