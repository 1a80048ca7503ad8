"""Local lm-eval task files are code: which ``!function`` references a plan's ``eval.include`` would run.

lm-eval resolves ``process_results: !function helpers.fn`` by importing ``helpers.py`` from beside the YAML (or any
path the dotted name reaches, ``..`` included) and calling it. A task directory is therefore as trusting as a
Python import: surgery runs such code only when the plan says ``eval.trust_code: true``, with one exception, the
helpers surgery itself ships (``surgery/demo/templates/*.py``, which ``surgery fetch-demo`` copies beside its task
YAMLs). A helper counts as shipped only when its bytes equal a shipped file's, so a copy someone edited is code
like any other. The shipped files are read as data here, never imported.

This module imports nothing of ours.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

#: Helpers surgery ships for its own demo tasks (read as bytes, compared by sha256).
SHIPPED = Path(__file__).resolve().parent / "demo" / "templates"
_FUNCTION = re.compile(r"!function\s+([^\s#]+)")
_INCLUDE = re.compile(r"^\s*include\s*:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)
#: Task files read per include directory at most (a directory of millions of files is refused, not walked).
MAX_FILES = 10_000


@dataclass(frozen=True)
class TaskCode:
    """One ``!function`` reference: the YAML naming it, the dotted name, the module file it would import."""

    yaml: Path
    name: str
    module: Path

    def __str__(self) -> str:
        return f"{self.yaml}: !function {self.name} (runs {self.module})"


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def shipped_hashes() -> set[str]:
    """sha256 of every helper module surgery ships for its own tasks."""
    return {h for p in sorted(SHIPPED.glob("*.py")) if (h := _sha(p)) is not None}


def _module_of(yaml_file: Path, name: str) -> Path:
    # lm-eval's own resolution (lm_eval.utils.import_function): "a.b.fn" -> <yaml dir>/a.b.py
    module = ".".join(name.split(".")[:-1])
    return Path(os.path.normpath(yaml_file.parent / f"{module}.py"))


def _yaml_files(directory: Path) -> list[Path]:
    files = []
    for dirpath, _, names in os.walk(directory):
        files += [Path(dirpath) / n for n in sorted(names) if n.endswith((".yaml", ".yml"))]
        if len(files) > MAX_FILES:
            raise ValueError(f"{directory} holds more than {MAX_FILES} task files; name a smaller directory")
    return files


def task_code(include: list[Path] | tuple[Path, ...]) -> list[TaskCode]:
    """Every ``!function`` reference in the task YAMLs under ``include`` (and the YAMLs they ``include:``) whose
    module is not one surgery ships: the code lm-eval would run from these directories."""
    shipped = shipped_hashes()
    seen: set[Path] = set()
    todo = [f for d in include if Path(d).is_dir() for f in _yaml_files(Path(d))]
    found: list[TaskCode] = []
    while todo:
        yaml_file = todo.pop()
        key = Path(os.path.normpath(yaml_file.absolute()))
        if key in seen:
            continue
        seen.add(key)
        try:
            text = yaml_file.read_text(errors="replace")
        except OSError:
            continue
        for m in _FUNCTION.finditer(text):
            module = _module_of(key, m.group(1))
            if _sha(module) not in shipped:
                found.append(TaskCode(yaml_file, m.group(1), module))
        for m in _INCLUDE.finditer(text):
            target = Path(m.group(1))
            todo.append(target if target.is_absolute() else key.parent / target)
    return found


def untrusted_message(code: list[TaskCode]) -> str:
    """The error for task files that would run code the plan did not trust."""
    more = f" (and {len(code) - 1} more)" if len(code) > 1 else ""
    return (f"local task files are code: {code[0]}{more}; lm-eval would import and run it. Set eval.trust_code: "
            "true if you trust these files")
