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
- No write follows a symbolic link surgery did not create: every file is written by ``write_file`` (a fresh temporary
  file opened with ``O_CREAT | O_EXCL | O_NOFOLLOW`` in the same directory, then renamed over the target), the lock
  is opened with ``O_NOFOLLOW``, and a target, marker, lock or run subdirectory that is a link is refused with an
  ``OutputError`` naming it. Only the output directory a user names may itself be a link (``runs -> /scratch``).
- ``force`` lets surgery write into a directory it did not create; it never deletes or overwrites a file surgery did
  not write (only names the directory's marker lists are replaced).
"""

from __future__ import annotations

import json
import os
import secrets
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


#: What torchrun and accelerate launch set in every process they start; surgery trusts RANK only with all of them.
LAUNCHER_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch() -> tuple[int, int]:
    """``(rank, world size)`` from a launcher's environment, checked; ``(0, 1)`` when no launcher started us.

    A stray ``RANK=1`` (or ``WORLD_SIZE``) left in a shell would make this process skip every write and wait on
    peers that do not exist, so the variables count only when a launcher's whole set is there and consistent.

    Raises:
        OutputError: a partial or inconsistent set (the message names the variables and the way out).
    """
    env = os.environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return 0, 1
    missing = [k for k in LAUNCHER_KEYS if k not in env]
    if missing:
        given = ", ".join(f"{k}={env[k]}" for k in LAUNCHER_KEYS if k in env)
        raise OutputError(f"the environment sets {given} but not {', '.join(missing)}: surgery trusts RANK and "
                          "WORLD_SIZE only under torchrun or accelerate launch (which set all of them); unset them or "
                          "start the command with a launcher")  # fmt: skip
    try:
        rank_, local, world = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    except ValueError:
        raise OutputError(f"RANK={env['RANK']!r}, LOCAL_RANK={env['LOCAL_RANK']!r}, WORLD_SIZE="
                          f"{env['WORLD_SIZE']!r}: not integers") from None  # fmt: skip
    if not (world >= 1 and 0 <= rank_ < world and 0 <= local <= rank_):
        raise OutputError(f"RANK={rank_}, LOCAL_RANK={local}, WORLD_SIZE={world} are inconsistent (need 0 <= "
                          "LOCAL_RANK <= RANK < WORLD_SIZE)")  # fmt: skip
    return rank_, world


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


def refuse_link(path: Path, what: str = "") -> None:
    """Raise ``OutputError`` when ``path`` is a symbolic link (surgery never writes through one it did not create)."""
    if Path(path).is_symlink():
        raise OutputError(f"{path} is a symbolic link{' (' + what + ')' if what else ''}; surgery does not write "
                          "through links it did not create: remove it or choose another output")


def write_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically without following links: a fresh temporary file in the same directory
    (``O_CREAT | O_EXCL | O_NOFOLLOW``), then renamed over ``path`` (a rename replaces a name, never a link's target).

    Raises:
        OutputError: ``path`` is a symbolic link or a directory.
    """
    path = Path(path)
    refuse_link(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; surgery writes a file there: move it away or choose another output")
    with temporary_file(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return path


class temporary_file:  # noqa: N801 - used as a context manager, like tempfile's
    """``with temporary_file(path) as tmp``: ``tmp`` is a fresh empty file next to ``path`` (created exclusively, so no
    planted link is followed); on success it is renamed over ``path``, on failure removed. For writers that take a
    file name (safetensors, matplotlib)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")

    def __enter__(self) -> Path:
        refuse_link(self.path)
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        try:
            refuse_link(self.path)  # a link planted while we wrote is refused, not replaced silently
            os.replace(self.tmp, self.path)  # atomic: a reader sees the old file or the new one
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise


def written_files(path: Path) -> set[str]:
    """The names the marker of ``path`` lists as surgery's own (empty when there is no readable marker)."""
    marker = Path(path) / MARKER
    if marker.is_symlink():
        return set()
    try:  # the same marker as surgery.artifacts_fs writes in saved model directories
        data = json.loads(marker.read_text())
        files = data.get("files", [])
        return {str(f) for f in files} if isinstance(files, list) else set()
    except (OSError, ValueError, AttributeError):
        return set()


_written = written_files


def _mark(path: Path, files: set[str]) -> None:
    refuse_link(path / MARKER, "surgery's ownership marker")
    write_file(path / MARKER, json.dumps({"written_by": "surgery", "files": sorted(files)}, indent=1))


def check_writable(path: str | os.PathLike, force: bool = False) -> None:
    """Refuse, before any work, an output that is a file or a non-empty directory surgery did not create.

    Raises:
        OutputError: naming the path and the way out (``--force``).
    """
    path = Path(path)
    refuse_link(path / MARKER, "surgery's ownership marker")
    refuse_link(path / LOCK, "surgery's lock file")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} is a file, not a directory; choose another output")
    if path.is_dir() and not is_ours(path) and any(p.name != LOCK for p in path.iterdir()) and not force:
        raise OutputError(
            f"output {path} is a non-empty directory that surgery did not create; choose another output, or pass "
            "--force (force=True) to write into it (surgery never deletes files it did not write)"
        )


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a directory surgery created (it holds the marker, a file and not a link)."""
    marker = Path(path) / MARKER
    return marker.is_file() and not marker.is_symlink()


def claim_dir(path: str | os.PathLike, force: bool = False) -> Path:
    """Make ``path`` a surgery directory: create it, or accept it when empty or ours (or ``force``).

    Raises:
        OutputError: ``path`` is a file, or a non-empty directory surgery did not create (without ``force``), or its
            marker or lock is a symbolic link.
    """
    path = Path(path)
    check_writable(path, force)
    path.mkdir(parents=True, exist_ok=True)
    if not is_ours(path):
        _mark(path, set())
    return path


def sub_dir(root: Path, name: str) -> Path:
    """``root/name``, a directory of a run (``eval``, ``recover``): created, never a link, claimed as ours.

    Raises:
        OutputError: it is a link, a file, or a non-empty directory surgery did not create.
    """
    path = Path(root) / name
    refuse_link(path, "a directory of the run")
    return claim_dir(path)


def write_owned(directory: Path, name: str, text: str | bytes, force: bool = False) -> Path:
    """Write ``directory/name`` unless a file of that name exists that surgery did not write there.

    ``directory`` is claimed first (``claim_dir``: a non-empty directory surgery did not create needs ``force``).

    Raises:
        OutputError: the file exists and is the user's, or it (or the marker) is a symbolic link.
    """
    directory = claim_dir(directory, force=force) if not is_ours(directory) else directory
    target = directory / name
    written = written_files(directory)
    refuse_link(target)
    if target.exists() and name not in written:
        raise OutputError(f"{target} exists and was not written by surgery; move it away or choose another output")
    if name not in written:
        _mark(directory, written | {name})  # listed first: a crash leaves a listed name, never an unlisted file
    write_file(target, text)
    return target


def refuse_links_under(path: Path) -> None:
    """Refuse a symbolic link anywhere under ``path``, a tree only surgery writes (a run's directories): writers
    that are not ours (peft, the Trainer, matplotlib) would follow it.

    Raises:
        OutputError: naming the first link found.
    """
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        refuse_link(path, "a directory of the run")
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            refuse_link(Path(dirpath) / name, "inside a directory surgery writes")


class OutputLock:
    """An exclusive advisory lock on ``directory`` for the life of a ``with`` block (POSIX ``flock``).

    The lock file ``.surgery.lock`` is opened with ``O_NOFOLLOW`` (a planted link is refused, never truncated) and
    removed on exit, so a finished or failed command leaves no lock behind. Under torchrun / accelerate launch only
    rank 0 takes it: the processes of one run share their directories (and the other ranks write nothing there but
    their own random states in checkpoints).

    Raises:
        OutputError: on enter, when another process holds the lock (the message names its pid), or the lock file is
            a link or not a regular file.
    """

    def __init__(self, directory: str | os.PathLike, name: str = LOCK) -> None:
        self.path = Path(directory) / name
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl
        import stat

        if launch()[0] != 0:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            refuse_link(self.path, "surgery's lock file")
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as exc:  # ELOOP: a link planted between the check and the open
                raise OutputError(f"{self.path}: cannot open surgery's lock file ({exc.strerror})") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OutputError(f"{self.path} is not a regular file; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(
                    f"{self.path.parent} is in use by another surgery process (pid {holder}); wait for it to finish"
                ) from None
            try:  # the holder before us may have removed the file we opened: lock the one that is there now
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        import fcntl

        if self._fd is not None:
            try:
                if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self._fd).st_ino:
                    self.path.unlink()  # removed while still held: a waiter re-checks the inode (above)
            except FileNotFoundError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
