"""Save/load: HF layout, identical logits through surgery.load and AutoModelForCausalLM, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import surgery
from tests.models import tiny_model

PLAN = {"version": 1, "model": "unused/hub-id", "convert": [{"layers": "0-1", "mixer": "softmax"}]}


@pytest.fixture
def converted(registry):
    model = tiny_model("qwen3")  # q/k norms: exercises copied norm modules
    return surgery.convert(surgery.load_plan(PLAN, registry), model, registry=registry)


def test_round_trip_gives_identical_logits(converted, tmp_path: Path) -> None:
    ids = torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = converted(ids).logits
    out = surgery.save(converted, tmp_path / "m")
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "config.json" in files and "manifest.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "surgery" and config["plan"]["convert"][0]["mixer"] == "softmax"
    assert config["base_config"]["model_type"] == "qwen3" and "torch" in config["versions"]
    for loaded in (surgery.load(out), AutoModelForCausalLM.from_pretrained(out)):
        assert type(loaded).__name__ == "Qwen3ForCausalLM"
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ref)
        assert [r.layer for r in loaded.surgery.manifest] == [0, 1]


def test_failed_save_leaves_nothing(converted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(converted), "save_pretrained", explode)
    with pytest.raises(OSError, match="disk full"):
        surgery.save(converted, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_an_existing_directory(converted, tmp_path: Path) -> None:
    surgery.save(converted, tmp_path / "m")
    surgery.save(converted, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_refuses_unconverted_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="converted by surgery"):
        surgery.save(tiny_model("llama"), tmp_path / "m")
