"""Layer selection (``surgery.select``) on a tiny model: the ranking, the hybrid plan, the command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import surgery
from surgery.cli import main
from surgery.select import hybrid_plan, layer_damage
from tests.models import tiny_model


def _plan(**rule: Any) -> dict[str, Any]:
    return {"version": 2, "model": "unused/hub-id",
            "convert": [{"layers": "all", "mixer": "liger_attention", "options": {"window": 2}} | rule]}


def test_damage_ranks_every_converted_layer_and_leaves_the_base_alone() -> None:
    base = tiny_model("llama")
    x = torch.randint(3, 160, (2, 16), generator=torch.Generator().manual_seed(0))
    before = base(x).logits
    damage = layer_damage(surgery.load_plan(_plan()), base, x)
    assert sorted(damage.kl) == [0, 1, 2] and sorted(damage.ranking) == [0, 1, 2]
    assert all(v > 0 for v in damage.kl.values())
    assert damage.kl[damage.ranking[0]] >= damage.kl[damage.ranking[-1]]
    assert damage.tokens == 32
    torch.testing.assert_close(base(x).logits, before, rtol=0, atol=0)  # every layer swapped back
    assert damage.keep(2) == sorted(damage.ranking[:2])
    with pytest.raises(ValueError, match="keep=5"):
        damage.keep(5)


def test_a_window_that_covers_the_sequence_does_no_damage() -> None:
    """SWA with a window longer than the text is the base attention exactly: KL 0 for every layer."""
    base = tiny_model("llama")
    x = torch.randint(3, 160, (1, 12), generator=torch.Generator().manual_seed(1))
    damage = layer_damage(surgery.load_plan(_plan(mixer="swa", options={"window": 64})), base, x)
    assert max(damage.kl.values()) < 1e-9


def test_hybrid_plan_removes_kept_layers_from_every_rule() -> None:
    raw = {"version": 2, "model": "m",
           "convert": [{"layers": "0-3", "mixer": "gla"}, {"layers": [4, 5], "mixer": "swa"}]}
    out = hybrid_plan(raw, [1, 4], 6)
    assert [r["layers"] for r in out["convert"]] == [[0, 2, 3], [5]]
    assert raw["convert"][0]["layers"] == "0-3"  # the input is not modified
    assert [r["mixer"] for r in hybrid_plan(raw, [4, 5], 6)["convert"]] == ["gla"]  # an emptied rule goes
    with pytest.raises(ValueError, match="nothing to convert"):
        hybrid_plan(raw, list(range(6)), 6)


def test_select_command_writes_a_loadable_hybrid_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    vocab = {f"w{i}": i for i in range(159)} | {"[UNK]": 159}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2", unk_token="[UNK]").save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": " ".join(f"w{(7 * i + j) % 150 + 3}" for j in range(40))})
                              for i in range(20)))  # fmt: skip
    plan = _plan() | {"model": str(model_dir), "recover": {"data": {"source": str(data), "seq_len": 16},
                                                            "stages": {"lora": {"tokens": 64}}}}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    out = tmp_path / "hybrid.yaml"
    (tmp_path / "hybrid.json").write_text("my notes")  # a file select is not given: never written
    args = ["select", str(tmp_path / "plan.yaml"), "--keep", "1", "--tokens", "64", "-o", str(out), "--ranking",
            str(tmp_path / "ranking.json")]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "softmax" in printed.out and "hybrid plan written" in printed.out
    assert [line.split(" (")[0] for line in printed.err.splitlines() if line.startswith("select:")] == [
        f"select: chunk {i}/4" for i in range(1, 5)]  # progress: 64 tokens in chunks of the plan's 16
    ranking = json.loads((tmp_path / "ranking.json").read_text())
    assert (tmp_path / "hybrid.json").read_text() == "my notes"
    hybrid = surgery.load_plan(str(out))
    assert len(hybrid.convert[0].layers) == 2 and ranking["keep"][0] not in hybrid.convert[0].layers
    assert ranking["tokens"] == 64
    assert main(args + ["--seq-len", "32"]) == 0  # longer calibration chunks: 2 of 32
    assert json.loads((tmp_path / "ranking.json").read_text())["tokens"] == 64  # select's own files are replaced
    assert "select: chunk 2/2 (32 tokens" in capsys.readouterr().err
    plan_text = (tmp_path / "plan.yaml").read_text()
    assert main(["select", str(tmp_path / "plan.yaml"), "--keep", "1", "-o", str(tmp_path / "plan.yaml")]) == 2
    assert main(["select", str(tmp_path / "plan.yaml"), "--keep", "1", "-o", str(tmp_path / "hybrid.json")]) == 2
    assert "was not written by surgery select" in capsys.readouterr().err
    assert (tmp_path / "plan.yaml").read_text() == plan_text and (tmp_path / "hybrid.json").read_text() == "my notes"
