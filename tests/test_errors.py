"""Every user-caused error subclasses ``SurgeryError``, and the CLI turns each into exit 2 with its message alone."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import surgery
from surgery import cli
from surgery.errors import SurgeryError


def _import_all() -> None:
    """Import every module of the package, so that every subclass of ``SurgeryError`` defined anywhere exists."""
    for info in pkgutil.walk_packages(surgery.__path__, "surgery."):
        importlib.import_module(info.name)


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


_import_all()
ERRORS = sorted(set(_subclasses(SurgeryError)), key=lambda c: f"{c.__module__}.{c.__qualname__}")


def test_the_known_user_errors_are_all_there() -> None:
    names = {c.__name__ for c in ERRORS}
    assert {"PlanError", "PluginError", "UnknownNameError", "AttentionReadError", "MixerDimsError", "OutputError",
            "ArtifactError", "DataError", "TrainingDiverged", "StaticCacheError", "ModelNotFoundError"} <= names


@pytest.mark.parametrize("error", ERRORS, ids=lambda c: c.__name__)
def test_every_user_error_exits_2_with_one_located_line(
    error: type[SurgeryError], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    message = "layer 3 (model.layers.3.self_attn, LlamaAttention): what went wrong"

    def fails(_args: object) -> int:
        raise error(message)

    monkeypatch.setattr(cli, "cmd_check", fails)
    assert cli.main(["check", "plan.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("surgery check: error: ") and message in err
    assert "Traceback" not in err


def test_a_bug_is_not_a_user_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fails(_args: object) -> int:
        raise ValueError("a bug of ours")

    monkeypatch.setattr(cli, "cmd_check", fails)
    assert cli.main(["check", "plan.yaml"]) == 1
    assert "ValueError: a bug of ours" in capsys.readouterr().err


def test_errors_module_imports_nothing() -> None:
    import ast
    from pathlib import Path

    tree = ast.parse(Path(surgery.__file__).with_name("errors.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [n.module for n in imports if isinstance(n, ast.ImportFrom)] == ["__future__"]
