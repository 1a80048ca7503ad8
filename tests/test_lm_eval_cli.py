"""``surgery lm-eval``: lm-eval's CLI on a saved surgery directory, with a local task and a tokenizer made here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import surgery
from surgery.cli import main
from tests.models import tiny_model

TEXTS = ["the cat sat on the mat and looked at the door", "a small model reads a short text about cats"]

TASK = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def _ppl(model_dir: Path, task_dir: Path, out: Path) -> float:
    args = ["lm-eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32", "--tasks", "tiny_ppl",
            "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1", "--output_path", str(out)]  # fmt: skip
    assert main(args) == 0
    (result,) = out.rglob("results_*.json")
    return json.loads(result.read_text())["results"]["tiny_ppl"]["word_perplexity,none"]


def test_lm_eval_reads_a_saved_directory(registry, tmp_path: Path) -> None:
    tok = _tokenizer()
    base = tiny_model("llama", num_hidden_layers=2, vocab_size=len(tok))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_ppl.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    plan = {"version": 2, "model": "unused/hub-id", "convert": [{"layers": "all", "mixer": "softmax"}]}
    converted = surgery.convert(surgery.load_plan(plan, registry), base)
    saved = surgery.save(converted, tmp_path / "converted", tokenizer=tok)
    # The identity conversion must score exactly what the plain model scores: the saved directory really loaded.
    assert _ppl(saved, tasks, tmp_path / "out-c") == pytest.approx(_ppl(tmp_path / "base", tasks, tmp_path / "out-b"))


def test_help_and_errors_are_lm_eval_s(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lm-eval", "--help"]) == 0
    assert "--model" in capsys.readouterr().out
    assert main(["lm-eval", "run", "--no-such-option"]) != 0
