"""`surgery run`: convert -> recover -> eval -> save into the plan's output, with a model card of every part."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import surgery
from surgery import demo
from surgery.cli import main
from tests.models import tiny_model
from tests.test_evaluate import _offline_tokenizer


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, demo.DataPaths]:
    """A 2-layer tiny Llama with a tokenizer of its own, saved like a hub model, and the demo data."""
    path = tmp_path_factory.mktemp("tiny-tok")
    tok = _offline_tokenizer()
    model = tiny_model("llama", num_hidden_layers=2, vocab_size=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    data = demo.build_data_at(tmp_path_factory.mktemp("data"))
    return path, data


def test_run_writes_model_card_and_a_model_that_loads(tiny_with_tokenizer, tmp_path: Path) -> None:
    model_dir, data = tiny_with_tokenizer
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump({
        "version": 1, "model": str(model_dir), "output": str(tmp_path / "run"),
        "convert": [{"layers": "all", "mixer": "liger_attention", "options": {"window": 4}}],
        "recover": {"data": {"source": str(data.train), "seq_len": 64, "max_records": 4},
                    "train": {"max_steps": 3, "save_steps": 2, "batch_size": 2}},
        "eval": {"tasks": ["wiki_ppl", "wiki_nextsent"], "limit": 2, "data_dir": str(data.root),
                 "max_length": 256},
    }))  # fmt: skip
    assert main(["run", str(plan_path)]) == 0
    out = tmp_path / "run"
    card = (out / "README.md").read_text()
    for part in ("## Plan", "## Mapping manifest", "## Recovery", "loss.png", "## Evaluation", "wiki_ppl",
                 "## Sample", "## Wall times", "## Versions", "Tokens: 384"):
        assert part in card, part
    assert (out / "recover" / "loss.png").exists() and (out / "recover" / "loss.csv").exists()
    assert (out / "eval" / "results.json").exists() and (out / "eval" / "results.png").exists()
    loaded = surgery.load(out / "model")
    assert (out / "model" / "README.md").exists()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        gen = loaded.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)


def test_stage_commands_recover_then_eval(tiny_with_tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir, data = tiny_with_tokenizer
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump({
        "version": 1, "model": str(model_dir), "output": str(tmp_path / "run"),
        "convert": [{"layers": "all", "mixer": "gla"}],
        "recover": {"data": {"source": str(data.train), "seq_len": 64, "max_records": 4},
                    "train": {"max_steps": 2, "save_steps": 2}},
        "eval": {"tasks": ["wiki_ppl"], "limit": 2, "data_dir": str(data.root), "max_length": 256},
    }))  # fmt: skip
    assert main(["convert", str(plan_path)]) == 0
    assert main(["recover", str(plan_path)]) == 0
    recovered = tmp_path / "run" / "recover" / "model"
    assert (recovered / "model.safetensors").exists()
    assert main(["eval", str(plan_path)]) == 0
    assert "wiki_ppl" in capsys.readouterr().out
    # eval picked the recovered model, not the converted one: their weights differ.
    a, b = surgery.load(recovered), surgery.load(tmp_path / "run" / "convert")
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)
