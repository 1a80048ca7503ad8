"""The directory mechanics of ``surgery.save``: atomic replacement, an ownership marker, crash recovery.

A save writes everything into a fresh sibling ``.<name>.<16 hex>``, then swaps it in with two renames::

    <name>  ->  .<name>.old          (only when <name> exists)
    .<name>.<hex>  ->  <name>
    remove .<name>.old

A crash at any point leaves, under ``<name>``, either the previous complete directory or the new complete one
(between the two renames ``<name>`` is briefly absent and ``.<name>.old`` holds the previous one; the next save or
load renames it back). Leftover temporary directories and a stale ``.<name>.old`` are removed by the next save.

Ownership: every saved directory holds ``.surgery``, a JSON marker listing the entries surgery wrote. ``save``
refuses to replace a non-empty directory without it (unless ``force``), refuses a path that is a file or a link, and
carries over into the new directory every entry of the old one that the marker does not list (files the user added;
with ``force``, every entry of an unmarked directory), so nothing of the user's is deleted. An entry of the user's
whose name the new save also writes is refused, ``force`` or not: ``force`` never overwrites a user's file. Only a
``.<name>.old`` that surgery marked is renamed back or removed; a user's own is refused.
Saves to one path must not run concurrently: the second would clean the first's temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from surgery.errors import ArtifactError

MARKER = ".surgery"


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _temp_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{16}}")


def _marker_files(directory: Path) -> list[str] | None:
    """The entries surgery wrote into ``directory``, or None when it holds no readable marker (not ours)."""
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    return [str(f) for f in files] if isinstance(files, list) else None


def _ours(directory: Path) -> bool:
    return _marker_files(directory) is not None


def recover_interrupted(path: Path) -> None:
    """Undo what a killed save left: a marked ``.<name>.old`` without ``<name>`` is renamed back (load and save call
    this). A ``.<name>.old`` without the marker is the user's and stays where it is."""
    old = _old(path)
    if not path.exists() and not path.is_symlink() and old.is_dir() and not old.is_symlink() and _ours(old):
        old.rename(path)


def _clean_leftovers(path: Path) -> None:
    """Remove temporary directories and a stale ``.<name>.old`` of earlier, interrupted saves of ``path``."""
    recover_interrupted(path)
    pattern = _temp_pattern(path)
    for entry in path.parent.iterdir():
        # Only directories of our naming that are empty (killed before the marker) or marked as ours.
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            if _ours(entry) or not any(entry.iterdir()):
                shutil.rmtree(entry)
    old = _old(path)
    if old.exists() or old.is_symlink():
        if old.is_symlink() or not old.is_dir() or not _ours(old):
            raise ArtifactError(f"{old} exists and was not written by surgery; move it away to save to {path}")
        shutil.rmtree(old)


def _user_entries(path: Path, force: bool) -> list[Path]:
    """Entries of the existing ``path`` that surgery did not write (to carry over); refuse what is not ours."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ArtifactError(f"{path} exists and is not a directory (or is a link): save() writes a directory; choose "
                            "another path")  # fmt: skip
    if (path / MARKER).is_symlink():
        raise ArtifactError(f"{path / MARKER} is a symbolic link, not surgery's marker; remove it")
    if not path.exists():
        return []
    listed = _marker_files(path)
    if listed is None:
        if any(path.iterdir()) and not force:
            raise ArtifactError(
                f"{path} is a non-empty directory that surgery did not write (no {MARKER} marker); refusing to "
                "write into it (pass force=True to add the model beside its files: none is deleted)"
            )
        return [p for p in sorted(path.iterdir()) if p.name != MARKER]  # forced: every entry is the user's
    return [p for p in sorted(path.iterdir()) if p.name != MARKER and p.name not in listed]


def _make_temp_dir(path: Path) -> Path:
    # os.mkdir applies the user's umask (tempfile.mkdtemp would make the final directory 0700).
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue


def _carry_over(entries: list[Path], tmp: Path, force: bool) -> None:
    for src in entries:
        dst = tmp / src.name
        if dst.exists() or dst.is_symlink():
            raise ArtifactError(f"{src} was not written by surgery and the new save writes the same name; move it "
                                "away (surgery never overwrites a file it did not write, force or not)")
        # Copied, not moved: until the swap the old directory must stay complete.
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)


def write_atomically(path: Path, write: Callable[[Path], None], force: bool = False) -> Path:
    """Call ``write(tmp)`` to fill a fresh directory, then make it ``path`` atomically; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    user = _user_entries(path, force)
    tmp = _make_temp_dir(path)
    try:
        # The marker goes first so that a leftover of a killed save is recognisably ours.
        (tmp / MARKER).write_text(json.dumps({"files": []}))
        write(tmp)
        written = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
        _carry_over(user, tmp, force)
        (tmp / MARKER).write_text(json.dumps({"written_by": "surgery", "files": written}, indent=1))
        old = _old(path)
        moved = path.exists()
        if moved:
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_interrupted(path)  # a failure between the two renames must not leave <name> missing
        raise
    if moved:  # only the directory this save moved aside; every entry of the user's was carried over
        shutil.rmtree(old, ignore_errors=True)
    return path
