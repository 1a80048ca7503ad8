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
        "version": 2, "model": str(model_dir), "output": str(tmp_path / "run"),
        "convert": [{"layers": "all", "mixer": "liger_attention", "options": {"window": 4}}],
        "recover": {"data": {"source": str(data.train), "seq_len": 64, "max_records": 4},
                    "stages": {"lora": {"max_steps": 3, "save_steps": 2, "batch_size": 2}}},
        "eval": {"tasks": ["wiki_ppl", "wiki_nextsent"], "limit": 2, "include": [str(data.tasks_dir)],
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


def _stage_plan(model_dir: Path, data: demo.DataPaths, path: Path, output: str | None) -> Path:
    plan = {
        "version": 2, "model": str(model_dir),
        "convert": [{"layers": "all", "mixer": "gla"}],
        "recover": {"data": {"source": str(data.train), "seq_len": 64, "max_records": 4},
                    "stages": {"lora": {"max_steps": 2, "save_steps": 2}}},
        "eval": {"tasks": ["wiki_ppl"], "limit": 2, "include": [str(data.tasks_dir)], "max_length": 256},
    }  # fmt: skip
    if output is not None:
        plan["output"] = output
    path.write_text(yaml.safe_dump(plan))
    return path


def _count_loads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count reads of the base model and tokenizer from disk (transformers' from_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    counts = {"model": 0, "tokenizer": 0}
    for key, cls in (("model", AutoModelForCausalLM), ("tokenizer", AutoTokenizer)):
        real = cls.from_pretrained.__func__

        def counted(klass: type, *a: object, _real: object = real, _key: str = key, **k: object) -> object:
            counts[_key] += 1
            return _real(klass, *a, **k)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(counted))
    return counts


def test_stage_commands_with_no_output_share_one_directory(
    tiny_with_tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """convert, recover, eval with no output: in the plan all use runs/surgery: recover does not convert again,
    a second recover does not merge the adapters twice, eval evaluates the recovered model."""
    model_dir, data = tiny_with_tokenizer
    monkeypatch.chdir(tmp_path)
    plan_path = _stage_plan(model_dir, data, tmp_path / "plan.yaml", output=None)
    run = tmp_path / "runs" / "surgery"
    assert main(["convert", str(plan_path)]) == 0
    assert (run / "convert" / "model.safetensors").exists()
    import surgery.pipeline as pipeline

    converts = []
    monkeypatch.setattr(pipeline.Run, "converted", lambda self: converts.append(1))  # must not be called
    assert main(["recover", str(plan_path)]) == 0
    assert converts == [] and "converting now" not in capsys.readouterr().out
    first = surgery.load(run / "model").model.layers[0].self_attn.q_proj.weight.clone()
    assert main(["recover", str(plan_path)]) == 0  # finished stages reload; the merge happens once
    again = surgery.load(run / "model").model.layers[0].self_attn.q_proj.weight
    assert torch.equal(first, again)
    converted = surgery.load(run / "convert").model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(first, converted)
    assert main(["eval", str(plan_path)]) == 0
    assert "wiki_ppl" in capsys.readouterr().out


def test_run_reads_the_base_model_once(tiny_with_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One surgery run: the base weights and the tokenizer are read once, although the base model is converted,
    teaches the recovery and is the evaluation baseline."""
    model_dir, data = tiny_with_tokenizer
    plan_path = _stage_plan(model_dir, data, tmp_path / "plan.yaml", output=str(tmp_path / "run"))
    plan = surgery.load_plan(plan_path)
    plan = plan.model_copy(update={"recover": plan.recover.model_copy(update={"stages": surgery.load_plan(
        {**yaml.safe_load(plan_path.read_text()), "recover": {**yaml.safe_load(plan_path.read_text())["recover"],
         "stages": {"attention_transfer": {"max_steps": 1}, "lora": {"max_steps": 1}}}}).recover.stages})})
    counts = _count_loads(monkeypatch)
    registries = []
    real_load_registry = surgery.plan.load_registry
    monkeypatch.setattr(surgery.plan, "load_registry", lambda *a, **k: registries.append(1) or real_load_registry(*a, **k))
    report = surgery.run(plan)
    assert counts == {"model": 1, "tokenizer": 1}
    assert registries == []  # the run uses the registry the plan was validated against, and builds none
    assert set(report.recover.stages) == {"attention_transfer", "lora"} and report.eval["tasks"]["wiki_ppl"]
    assert (tmp_path / "run" / "report.json").is_file()


def test_run_never_overwrites_a_users_file(tiny_with_tokenizer, tmp_path: Path) -> None:
    model_dir, data = tiny_with_tokenizer
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    plan_path = _stage_plan(model_dir, data, tmp_path / "plan.yaml", output=str(out))
    assert main(["run", str(plan_path)]) == 2  # a non-empty directory surgery did not create
    assert main(["run", "--force", str(plan_path)]) == 2  # forced in, but README.md is still the user's
    assert (out / "README.md").read_text() == "my notes"
