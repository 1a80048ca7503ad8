"""Every subcommand, called as a careless user would: no arguments, a bad flag, and paths holding spaces, newlines
and links. Each case exits 2 with one located line, changes nothing on disk, and leaves no debris and no lock.
In-process calls of ``surgery.cli.main`` (fast); table-driven, so none regresses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from surgery.cli import main
from tests.test_hostile import _victim, plan, tiny  # noqa: F401 - tiny is a fixture

PLAN_COMMANDS = ["check", "convert", "recover", "eval", "run", "select"]
COMMANDS = PLAN_COMMANDS + ["generate", "fetch-demo", "plugins list", "plugins catalogue", "plan schema"]
NEEDS_ARGS = PLAN_COMMANDS + ["generate"]
ODD_NAMES = ["with space.yaml", "new\nline.yaml", "link.yaml"]


def _snapshot(d: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for p in sorted(d.rglob("*")):
        key = str(p.relative_to(d))
        out[key] = f"-> {os.readlink(p)}" if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


def _one_located_line(err: str, command: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("surgery") and "error" in lines[0], err  # unknown flags are the top parser's
    assert "Traceback" not in err


@pytest.mark.parametrize("command", NEEDS_ARGS)
def test_no_arguments(command: str, capsys: pytest.CaptureFixture) -> None:
    assert main(command.split()) == 2
    _one_located_line(capsys.readouterr().err, command)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_flag(command: str, capsys: pytest.CaptureFixture) -> None:
    assert main([*command.split(), "--no-such-flag"]) == 2
    _one_located_line(capsys.readouterr().err, command)


@pytest.mark.parametrize("name", ODD_NAMES, ids=["space", "newline", "link"])
@pytest.mark.parametrize("command", PLAN_COMMANDS)
def test_odd_plan_paths(command: str, name: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "target.yaml").write_text("version: 2\nmodel: not/cached-anywhere\nconvert: [{mixer: glaa}]\n")
    path = tmp_path / name
    if name == "link.yaml":
        path.symlink_to(tmp_path / "target.yaml")
    else:
        path.write_text((tmp_path / "target.yaml").read_text())
    before = _snapshot(tmp_path)
    extra = ["--keep", "1"] if command == "select" else []
    assert main([command, str(path), *extra]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("surgery ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "unknown mixer 'glaa'" in err or "model:" in err, err
    assert _snapshot(tmp_path) == before  # nothing written, nothing removed, no lock, no runs/ directory


@pytest.mark.parametrize("command", ["convert", "recover", "run", "eval"])
def test_an_output_that_is_a_link_to_a_file(command: str, tiny: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    victim = _victim(tmp_path)
    (tmp_path / "out").symlink_to(victim)
    p = plan(tmp_path, tiny, output=str(tmp_path / "out"), eval={"tasks": ["piqa"]})
    before = _snapshot(tmp_path)
    assert main([command, str(p)]) == 2
    _one_located_line(capsys.readouterr().err, command)
    assert _snapshot(tmp_path) == before and victim.read_text() == "keep me"
