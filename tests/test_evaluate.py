"""evaluate(): lm-eval on base and converted models, on the shipped local tasks, with tiny random Llamas."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import surgery
from surgery import demo
from surgery.evaluate import evaluate, format_table
from surgery.evaluate import EvalSpec

MODEL_DIR = demo.default_root() / "smollm2-135m"
HAVE_MODEL = (MODEL_DIR / "config.json").is_file()
LOCAL = ["wiki_ppl", "wiki_nextsent", "passkey_1k", "passkey_2k"]


def _offline_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained here in well under a second (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [t for _, t in demo.wiki_articles()[:3]]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR) if HAVE_MODEL else _offline_tokenizer()


def _tiny_llama(vocab: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> demo.DataPaths:
    return demo.build_data(tmp_path_factory.mktemp("demo"))


def _spec(data: demo.DataPaths, **kw: Any) -> EvalSpec:
    kw.setdefault("tasks", tuple(LOCAL))
    kw.setdefault("max_length", 2560)
    return EvalSpec(include=(data.tasks_dir,), batch_size=2, **kw)


def test_same_model_twice_gives_ratio_one(tokenizer: Any, data: demo.DataPaths, tmp_path: Path) -> None:
    model = _tiny_llama(len(tokenizer), seed=0)
    model.train()  # evaluate() switches to eval mode and back
    res = evaluate(model, _spec(data, limit=2), model, tokenizer, tmp_path)
    assert model.training
    assert list(res["tasks"]) == LOCAL
    for name, r in res["tasks"].items():
        assert r["samples"] == 2, name
        assert r["base"] == r["converted"], name
        assert r["ratio"] == (1.0 if r["base"] != 0 else None), name  # 0/0 has no ratio
        assert r["base_metrics"] == r["converted_metrics"]
    ppl = res["tasks"]["wiki_ppl"]
    assert ppl["metric"] == "word_perplexity" and not ppl["higher_is_better"]
    assert set(ppl["base_metrics"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert res["tasks"]["wiki_nextsent"]["metric"] == "acc_norm"
    assert res["tasks"]["passkey_2k"]["base"] in (0.0, 0.5, 1.0)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tasks"] == json.loads(json.dumps(res["tasks"]))
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in LOCAL)
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _word_perplexity(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> float:
    """Our own rolling loglikelihood: every token scored, the first one after a prefix token, as lm-eval does."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total, words = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[prefix] + tokenizer(text, add_special_tokens=False).input_ids])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            total += logp.gather(1, ids[0, 1:, None]).sum().item()
            words += len(re.split(r"\s+", text))
    return math.exp(-total / words)


def test_two_models_ratio_and_perplexity(tokenizer: Any, data: demo.DataPaths) -> None:
    base, conv = _tiny_llama(len(tokenizer), seed=0), _tiny_llama(len(tokenizer), seed=1)
    res = evaluate(conv, _spec(data, tasks=("wiki_ppl", "wiki_nextsent"), limit=3), base, tokenizer)
    for name, r in res["tasks"].items():
        assert r["samples"] == 3
        assert r["ratio"] == pytest.approx(r["converted"] / r["base"]), name
    ppl = res["tasks"]["wiki_ppl"]
    assert ppl["base"] != ppl["converted"]
    texts = [json.loads(line)["text"] for line in data.heldout_ppl.read_text().splitlines()[:3]]
    # Cross-check lm-eval's number with our own computation: the wiring (model, tokenizer, data) is right.
    assert ppl["base"] == pytest.approx(_word_perplexity(base, tokenizer, texts), rel=1e-3)
    assert ppl["converted"] == pytest.approx(_word_perplexity(conv, tokenizer, texts), rel=1e-3)


def test_base_loaded_from_plan_and_output_dir(tokenizer: Any, data: demo.DataPaths, tmp_path: Path) -> None:
    base = _tiny_llama(len(tokenizer), seed=0)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    plan = SimpleNamespace(eval=EvalSpec(include=(data.tasks_dir,), tasks=("wiki_ppl",), limit=1, max_length=1024),
                           model=str(tmp_path / "base"), dtype="float32", output=str(tmp_path / "out"))
    res = surgery.evaluate(base, plan)  # base and tokenizer come from plan.model (the one base loader)
    assert res["tasks"]["wiki_ppl"]["ratio"] == 1.0
    assert (tmp_path / "out" / "eval" / "results.json").is_file()


def test_errors_name_the_problem(tokenizer: Any, data: demo.DataPaths) -> None:
    model = _tiny_llama(len(tokenizer), seed=0)
    with pytest.raises(ValueError, match="base_model"):
        surgery.evaluate(model, None, tokenizer=tokenizer, tasks=["wiki_ppl"])
    with pytest.raises(ValueError, match="name the tasks"):
        evaluate(model, None, model, tokenizer)
    with pytest.raises(ValueError, match="eval.include: no such directory"):
        evaluate(model, EvalSpec(tasks=("x",), include=(Path("/nonexistent"),)), model, tokenizer)
    with pytest.raises(ValueError, match=r"wiki_ppx.*did you mean wiki_ppl"):
        evaluate(model, _spec(data), model, tokenizer, tasks=["wiki_ppx"])
    with pytest.raises(ValueError, match="eval.tasks is empty"):
        EvalSpec(tasks=())
    with pytest.raises(ValueError, match="limit"):
        EvalSpec(tasks=("piqa",), limit=0)
    with pytest.raises(ValueError, match="tasks"):
        EvalSpec()  # no default tasks: a bare eval: section names its own


def test_spec_defaults_and_limits() -> None:
    from surgery.evaluate import _groups

    spec = EvalSpec(tasks=("piqa",))
    assert spec.num_fewshot["mmlu"] == 5 and spec.limits == {} and spec.include == ()
    # null (or no entry) means the whole task; mmlu gets its own call with 5 shots.
    spec = EvalSpec(tasks=("wiki_ppl", "wiki_nextsent", "piqa", "mmlu"),
                    limits={"wiki_ppl": None, "wiki_nextsent": 10, "piqa": 50})  # fmt: skip
    assert _groups(spec) == [(None, None, ["wiki_ppl"]), (10, None, ["wiki_nextsent"]), (50, None, ["piqa"]),
                             (None, 5, ["mmlu"])]
    assert _groups(EvalSpec(tasks=tuple(LOCAL), limit=0.25))[0] == (0.25, None, LOCAL)  # a fraction stays one


def test_evaluate_does_not_import_the_demo() -> None:
    import ast
    import sys

    tree = ast.parse(Path(sys.modules["surgery.evaluate"].__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any("demo" in (m or "") for m in imported)


def test_format_table() -> None:
    results = {"tasks": {
        "wiki_ppl": {"metric": "word_perplexity", "higher_is_better": False, "base": 16.88, "converted": 77281.0,
                     "ratio": 77281.0 / 16.88, "samples": 20, "num_fewshot": 0},
        "mmlu": {"metric": "acc", "higher_is_better": True, "base": 0.3, "converted": 0.25, "ratio": 0.25 / 0.3,
                 "base_stderr": 0.01, "converted_stderr": 0.01, "samples": 100, "num_fewshot": 5},
        "passkey_1k": {"metric": "acc", "higher_is_better": True, "base": 0.0, "converted": 0.0, "ratio": None,
                       "samples": 10, "num_fewshot": 0},
    }}
    lines = format_table(results).splitlines()
    assert len(lines) == 5 and lines[0].startswith("| task |")
    assert lines[2] == "| wiki_ppl | word_perplexity ↓ | 16.88 | 77281.0 | 4578.3 | 20 |"
    assert lines[3] == "| mmlu (5-shot) | acc ↑ | 0.300 ± 0.010 | 0.250 ± 0.010 | 0.833 | 100 |"
    assert lines[4] == "| passkey_1k | acc ↑ | 0.000 | 0.000 | – | 10 |"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MODEL, reason=f"demo model not fetched ({MODEL_DIR})")
def test_smollm2_beats_a_random_model(tokenizer: Any, data: demo.DataPaths) -> None:
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    rand = _tiny_llama(len(tokenizer), seed=0)
    res = evaluate(rand, _spec(data, tasks=("wiki_ppl",), limit=2), real, tokenizer)
    r = res["tasks"]["wiki_ppl"]
    assert r["base"] < 200 < r["converted"] and r["ratio"] > 10


def test_long_task_pools_tokens_and_reports_the_late_positions(tokenizer: Any, data: demo.DataPaths) -> None:
    """wiki_long through lm-eval: token_perplexity pools every token of both halves, token_perplexity_late only
    the second halves; both reported rows match a direct computation of the model's log-likelihoods."""
    model = _tiny_llama(len(tokenizer), seed=3)
    spec = _spec(data, tasks=("wiki_long",), limit=4, metrics={"wiki_long": ("token_perplexity", "token_perplexity_late")},
                 max_length=4096)
    res = evaluate(model, spec, model, tokenizer)
    assert list(res["tasks"]) == ["wiki_long", "wiki_long/token_perplexity_late"]
    rows = [json.loads(line) for line in data.long_ppl.read_text().splitlines()][:4]  # two windows
    assert [r["late"] for r in rows] == [False, True, False, True]
    nll, n, nll_late, n_late = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for r in rows:
            ctx = tokenizer(r["context"])["input_ids"] if r["context"] else [tokenizer.eos_token_id]
            cont = tokenizer(r["continuation"], add_special_tokens=False)["input_ids"]
            logp = model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1].log_softmax(-1)
            ll = logp[torch.arange(len(cont)), torch.tensor(cont)].sum().item()
            nll, n = nll - ll, n + r["n_tokens"]
            if r["late"]:
                nll_late, n_late = nll_late - ll, n_late + r["n_tokens"]
    all_row, late_row = res["tasks"]["wiki_long"], res["tasks"]["wiki_long/token_perplexity_late"]
    assert all_row["metric"] == "token_perplexity" and not all_row["higher_is_better"]
    assert late_row["task"] == "wiki_long" and late_row["metric"] == "token_perplexity_late"
    assert math.isclose(all_row["base"], math.exp(nll / n), rel_tol=1e-3)
    assert math.isclose(late_row["base"], math.exp(nll_late / n_late), rel_tol=1e-3)
    with pytest.raises(ValueError, match="no metric 'token_perplexity_lat'"):
        evaluate(model, _spec(data, tasks=("wiki_long",), limit=2, metrics={"wiki_long": ("token_perplexity_lat",)},
                              max_length=4096), model, tokenizer)


def test_before_recovery_column_notes_and_chart(tokenizer: Any, data: demo.DataPaths, tmp_path: Path) -> None:
    """A third model (the conversion before recovery) gets its own column and ratio; notes are numbered under the
    table; the chart draws a ratio of exactly 1 as parity."""
    from surgery.evaluate import _verdict, score

    base, other = _tiny_llama(len(tokenizer), seed=0), _tiny_llama(len(tokenizer), seed=1)
    spec = _spec(data, tasks=("wiki_ppl", "passkey_1k"), limit=2, notes={"wiki_ppl": "exact by construction"})
    before = score(other, tokenizer, spec)
    res = evaluate(base, spec, base, tokenizer, tmp_path, before=before)
    ppl = res["tasks"]["wiki_ppl"]
    assert ppl["ratio"] == 1.0 and ppl["before"] != ppl["base"]
    assert ppl["before_ratio"] == pytest.approx(ppl["before"] / ppl["base"])
    assert ppl["note"] == "exact by construction" and "note" not in res["tasks"]["passkey_1k"]
    table = format_table(res)
    assert "| converted (no recovery) | ÷ base | recovered | ÷ base | n |" in table
    assert "wiki_ppl [1]" in table and "[1] exact by construction" in table
    assert (tmp_path / "results.png").stat().st_size > 0
    assert _verdict(1.0, True, None) == "parity" and _verdict(1.0004, True, None) == "parity"
    assert _verdict(1.2, True, None) == "worse" and _verdict(0.8, True, None) == "better"
    assert _verdict(0.9, False, 0.15) == "parity" and _verdict(0.5, False, 0.1) == "worse"
