"""Save/load: HF layout, identical logits through surgery.load and AutoModelForCausalLM, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import surgery
from tests.models import tiny_model

PLAN = {"version": 2, "model": "unused/hub-id", "convert": [{"layers": "0-1", "mixer": "softmax"}]}


@pytest.fixture
def converted(registry):
    model = tiny_model("qwen3")  # q/k norms: exercises copied norm modules
    return surgery.convert(surgery.load_plan(PLAN, registry), model)


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


# -- issue 15: tensors are stored under the model's own names, for every family -----------------------------------

from surgery.artifacts import ArtifactError  # noqa: E402
from surgery.artifacts_fs import MARKER  # noqa: E402
from tests.models import _SPECS  # noqa: E402


@pytest.mark.parametrize("arch", sorted(_SPECS))
def test_identity_round_trip_per_family(arch: str, registry, tmp_path: Path) -> None:
    """GPT-NeoX used to save ``embed_out.weight`` (its checkpoint name) and fail to load ``lm_head.weight``."""
    model = tiny_model(arch)
    plan = {"version": 2, "model": "unused/hub-id", "convert": [{"layers": "all", "mixer": "softmax"}]}
    converted = surgery.convert(surgery.load_plan(plan, registry), model)
    ids = torch.randint(3, 160, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = converted(ids).logits
    out = surgery.save(converted, tmp_path / "m")
    for loaded in (surgery.load(out), AutoModelForCausalLM.from_pretrained(out)):
        loaded.config._attn_implementation = converted.config._attn_implementation
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ref)


# -- issue 14: atomic, owned, recoverable saves ---------------------------------------------------------------------


def _note(path: Path) -> str:
    return (path / "note.txt").read_text()


@pytest.mark.parametrize("fail_at", ["write", "first_rename", "second_rename"])
def test_crash_leaves_old_or_new(converted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str) -> None:
    target = tmp_path / "m"
    surgery.save(converted, target, extra_files={"note.txt": "old"})
    if fail_at == "write":
        monkeypatch.setattr(type(converted), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    else:
        real, calls = Path.rename, []

        def rename(self: Path, dst):  # noqa: ANN001
            calls.append(self)
            if len(calls) == (1 if fail_at == "first_rename" else 2):
                raise OSError("killed")
            return real(self, dst)

        monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError):
        surgery.save(converted, target, extra_files={"note.txt": "new"})
    monkeypatch.undo()
    assert _note(target) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_kill_between_renames_is_recovered_by_load_and_save(converted, tmp_path: Path) -> None:
    target = tmp_path / "m"
    surgery.save(converted, target, extra_files={"note.txt": "old"})
    target.rename(tmp_path / ".m.old")  # a kill after the first rename, before the second
    leftover = tmp_path / ".m.0123456789abcdef"  # and the killed save's temporary directory
    leftover.mkdir()
    (leftover / MARKER).write_text('{"files": []}')
    surgery.load(target)
    assert _note(target) == "old"
    surgery.save(converted, target, extra_files={"note.txt": "new"})
    assert _note(target) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_stale_old_directory_is_cleaned(converted, tmp_path: Path) -> None:
    surgery.save(converted, tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / ".m.old")  # a kill after the second rename
    surgery.save(converted, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_saved_directory_is_marked_and_follows_umask(converted, tmp_path: Path) -> None:
    before = os.umask(0o022)
    try:
        out = surgery.save(converted, tmp_path / "m")
    finally:
        os.umask(before)
    assert (out / MARKER).is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_refuses_a_directory_it_did_not_write(converted, tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtifactError, match="did not write") as err:
        surgery.save(converted, target)
    assert "\n" not in str(err.value)
    assert (target / "thesis.tex").read_text() == "years of work"
    surgery.save(converted, target, force=True)  # forced in beside the user's file, which is kept
    assert (target / "config.json").exists() and (target / "thesis.tex").read_text() == "years of work"
    assert "thesis.tex" not in json.loads((target / MARKER).read_text())["files"]
    surgery.save(converted, target)  # now ours, the user's file still carried over
    assert (target / "thesis.tex").read_text() == "years of work"


def test_force_never_overwrites_or_deletes_a_users_file(converted, tmp_path: Path) -> None:
    target = tmp_path / "base"
    target.mkdir()
    (target / "config.json").write_text("{}")  # e.g. the plan's own base model directory
    with pytest.raises(ArtifactError, match=r"config.json was not written by surgery .* force or not"):
        surgery.save(converted, target, force=True)
    assert (target / "config.json").read_text() == "{}" and sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no temporary directory left


def test_a_users_hidden_old_directory_is_neither_renamed_nor_deleted(converted, tmp_path: Path) -> None:
    old = tmp_path / ".m.old"
    old.mkdir()
    (old / "mine.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"\.m\.old exists and was not written by surgery"):
        surgery.save(converted, tmp_path / "m", force=True)
    assert (old / "mine.txt").read_text() == "mine" and not (tmp_path / "m").exists()
    surgery.save(converted, tmp_path / "n")
    (tmp_path / ".n.old").write_text("a file of mine")
    with pytest.raises(ArtifactError, match="was not written by surgery"):
        surgery.save(converted, tmp_path / "n")
    assert (tmp_path / ".n.old").read_text() == "a file of mine"


def test_a_marker_that_is_a_link_is_refused(converted, tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (target / MARKER).symlink_to(victim)
    with pytest.raises(ArtifactError, match="symbolic link"):
        surgery.save(converted, target, force=True)
    assert victim.read_text() == "keep"


def test_refuses_a_file(converted, tmp_path: Path) -> None:
    target = tmp_path / "afile.txt"
    target.write_text("keep me")
    with pytest.raises(ArtifactError, match="not a directory"):
        surgery.save(converted, target)
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt"]


def test_user_files_in_a_saved_directory_are_carried_over(converted, tmp_path: Path) -> None:
    target = tmp_path / "m"
    surgery.save(converted, target, extra_files={"README.md": "card"})
    (target / "my-notes.txt").write_text("mine")
    (target / "evals").mkdir()
    (target / "evals" / "a.json").write_text("{}")
    surgery.save(converted, target)  # this save writes no README.md: the old one was ours, so it goes
    assert (target / "my-notes.txt").read_text() == "mine" and (target / "evals" / "a.json").exists()
    assert not (target / "README.md").exists()
    (target / "card.md").write_text("user's")
    with pytest.raises(ArtifactError, match="card.md"):
        surgery.save(converted, target, extra_files={"card.md": "generated"})
    assert (target / "card.md").read_text() == "user's"


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda c: c.pop("plan"), "no 'plan'"),
        (lambda c: c["base_config"].pop("model_type"), "base_config has no 'model_type'"),
        (None, "not valid JSON"),
    ],
)
def test_damaged_config_is_a_located_error(converted, tmp_path: Path, damage, message: str) -> None:  # noqa: ANN001
    out = surgery.save(converted, tmp_path / "m")
    cfg = out / "config.json"
    if damage is None:
        cfg.write_text(cfg.read_text()[:-20])
    else:
        data = json.loads(cfg.read_text())
        damage(data)
        cfg.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message) as err:
        surgery.load(out)
    assert str(cfg) in str(err.value)


def test_corrupt_manifest_warns_and_loads(converted, tmp_path: Path) -> None:
    out = surgery.save(converted, tmp_path / "m")
    (out / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match="manifest.json"):
        model = surgery.load(out)
    assert [r.layer for r in model.surgery.manifest] == [0, 1]


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd"])
def test_index_naming_a_file_outside_is_refused(converted, tmp_path: Path, name: str) -> None:
    out = surgery.save(converted, tmp_path / "m")
    (out / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": name}}))
    with pytest.raises(ArtifactError, match="outside"):
        surgery.load(out)


def test_truncated_tensors_name_the_file(converted, tmp_path: Path) -> None:
    out = surgery.save(converted, tmp_path / "m")
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=str(f)):
        surgery.load(out)


def test_load_does_not_need_the_base_model(registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_model("llama", num_hidden_layers=2).save_pretrained(tmp_path / "base")
    plan = surgery.load_plan({"version": 2, "model": "./base", "convert": [{"layers": "0", "mixer": "gla"}]}, registry)
    out = surgery.save(surgery.convert(plan), tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["plan"]["model"] == str(tmp_path / "base")
    shutil.rmtree(tmp_path / "base")
    assert type(surgery.load(out)).__name__ == "LlamaForCausalLM"
