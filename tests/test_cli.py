"""CLI: user mistakes exit 2 with one message (traceback only with -v); commands print what they say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgery.cli import main


def _plan(tmp_path: Path, text: str) -> str:
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return str(p)


def test_user_error_exits_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _plan(tmp_path, "version: 2\nmodel: x/y\nconvert:\n  - mixer: glaa\n")
    assert main(["check", path]) == 2
    err = capsys.readouterr().err
    assert "convert.0.mixer: unknown mixer 'glaa'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_verbose_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _plan(tmp_path, "version: 2\nmodel: x/y\nconvert:\n  - mixer: glaa\n")
    assert main(["-v", "check", path]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_missing_plan_file(capsys: pytest.CaptureFixture) -> None:
    assert main(["check", "no/such/plan.yaml"]) == 2
    assert "plan file 'no/such/plan.yaml' does not exist" in capsys.readouterr().err


def test_check_prints_layer_table(tmp_path: Path, tiny_dir: str, capsys: pytest.CaptureFixture) -> None:
    path = _plan(tmp_path, f"version: 2\nmodel: {tiny_dir}\nconvert:\n  - mixer: softmax\n    layers: '1'\n")
    assert main(["check", path]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn" in out and "LlamaAttention" in out and "model.layers.0" not in out


def test_convert_saves(tmp_path: Path, tiny_dir: str, capsys: pytest.CaptureFixture) -> None:
    path = _plan(tmp_path, f"version: 2\nmodel: {tiny_dir}\noutput: {tmp_path / 'run'}\nconvert:\n  - mixer: softmax\n")
    assert main(["convert", path]) == 0
    assert (tmp_path / "run" / "convert" / "model.safetensors").exists()
    assert "8 tensors copied" in capsys.readouterr().out


def test_plugins_list_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["plugins", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any("softmax" in r["mixers"] and r["distribution"] == "surgery" for r in rows)


def test_plan_schema_is_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "surgery plan"
