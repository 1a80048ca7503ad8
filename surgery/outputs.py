"""Where a run writes, decided in one place, and the rules that keep a user's files safe.

- ``run_paths(plan)`` gives every path of a run (CLI and API alike): ``<output>/convert`` (the converted model),
  ``<output>/recover`` (adapters, checkpoints, loss curves), ``<output>/eval`` (tables, chart), ``<output>/model``
  (the final model with its card) and ``<output>/README.md``, ``<output>/report.json``. With no ``output:`` in the
  plan, ``<output>`` is ``runs/surgery`` for every command, so ``surgery recover`` finds what ``surgery convert``
  wrote.
- A directory surgery writes holds a marker file (``.surgery``, JSON) listing the files it wrote there. surgery never
  deletes or overwrites a file it did not write, and refuses a non-empty directory without the marker unless
  ``force`` is given.
- ``OutputLock`` is an advisory lock per directory (``fcntl.flock``, released by the OS when a process dies), so two
  processes never write one run at once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from surgery.errors import ModelNotFoundError, OutputError

MARKER = ".surgery"
LOCK = ".surgery.lock"
DEFAULT_OUTPUT = Path("runs/surgery")


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run, under ``root``."""

    root: Path

    @property
    def convert(self) -> Path:
        return self.root / "convert"

    @property
    def recover(self) -> Path:
        return self.root / "recover"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def card(self) -> Path:
        return self.root / "README.md"

    @property
    def report(self) -> Path:
        return self.root / "report.json"


def run_paths(plan: Any, output: str | os.PathLike | None = None) -> RunPaths:
    """The paths of ``plan``'s run: ``output`` if given, else the plan's ``output:``, else ``runs/surgery``."""
    root = output if output is not None else (getattr(plan, "output", None) or DEFAULT_OUTPUT)
    return RunPaths(Path(root))


def saved_model_dir(path: str | os.PathLike) -> Path:
    """The saved model ``path`` names: the directory itself when it holds one, else the run's ``model/`` (recovered),
    else its ``convert/`` (``surgery generate`` takes either a model or a run directory)."""
    root = Path(path)
    paths = run_paths(None, root)
    for candidate in (root, paths.model, paths.convert):
        if (candidate / "config.json").exists():
            return candidate
    raise ModelNotFoundError(f"{root}: no saved model (config.json) in it, nor in its {paths.model.name}/ or "
                             f"{paths.convert.name}/")


def _written(path: Path) -> set[str]:
    try:  # the same marker as surgery.artifacts_fs writes in saved model directories
        data = json.loads((path / MARKER).read_text())
        return set(data.get("files", []))
    except (OSError, ValueError, AttributeError):
        return set()


def _mark(path: Path, files: set[str]) -> None:
    (path / MARKER).write_text(json.dumps({"written_by": "surgery", "files": sorted(files)}, indent=1))


def check_writable(path: str | os.PathLike, force: bool = False) -> None:
    """Refuse, before any work, an output that is a file or a non-empty directory surgery did not create.

    Raises:
        OutputError: naming the path and the way out (``--force``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} is a file, not a directory; choose another output")
    if path.is_dir() and not is_ours(path) and any(p.name != LOCK for p in path.iterdir()) and not force:
        raise OutputError(
            f"output {path} is a non-empty directory that surgery did not create; choose another output, or pass "
            "--force (force=True) to write into it (surgery never deletes files it did not write)"
        )


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a directory surgery created (it holds the marker)."""
    return (Path(path) / MARKER).is_file()


def claim_dir(path: str | os.PathLike, force: bool = False) -> Path:
    """Make ``path`` a surgery directory: create it, or accept it when empty or ours (or ``force``).

    Raises:
        OutputError: ``path`` is a file, or a non-empty directory surgery did not create (without ``force``).
    """
    path = Path(path)
    check_writable(path, force)
    path.mkdir(parents=True, exist_ok=True)
    if not is_ours(path):
        _mark(path, set())
    return path


def write_owned(directory: Path, name: str, text: str) -> Path:
    """Write ``directory/name`` unless a file of that name exists that surgery did not write there.

    Raises:
        OutputError: the file exists and is the user's.
    """
    directory = claim_dir(directory, force=True) if not is_ours(directory) else directory
    target = directory / name
    written = _written(directory)
    if target.exists() and name not in written:
        raise OutputError(f"{target} exists and was not written by surgery; move it away or choose another output")
    tmp = target.with_name(f".{name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)  # atomic: a reader sees the old file or the new one
    if name not in written:
        _mark(directory, written | {name})
    return target


class OutputLock:
    """An exclusive advisory lock on ``directory`` for the life of a ``with`` block (POSIX ``flock``).

    Under torchrun / accelerate launch only rank 0 takes it: the processes of one run share their directories (and
    the other ranks write nothing there but their own random states in checkpoints).

    Raises:
        OutputError: on enter, when another process holds the lock (the message names its pid).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOCK
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl

        if int(os.environ.get("RANK", "0")) != 0:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"{self.path.parent} is in use by another surgery process (pid {holder}); wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
