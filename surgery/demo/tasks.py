"""The local lm-eval tasks: their items (built from held-out text) and their task YAMLs.

Four tasks run offline, on files that ``surgery.demo.build_data`` writes:

| task | lm-eval output type | main metric | rows |
|---|---|---|---|
| ``wiki_ppl`` | loglikelihood_rolling | word_perplexity (lower is better) | ``{"title", "window", "text"}`` |
| ``wiki_nextsent`` | multiple_choice | acc_norm | ``{"context", "choices": [4], "label", "title"}`` |
| ``passkey_1k``, ``_2k``, ``_4k`` | loglikelihood | acc (greedy exact match) | ``{"prompt", "target", ...}`` |
| ``passkey_multi`` (4 keys, one asked, ~1K tokens) | loglikelihood | acc (greedy exact match) | same |
| ``wiki_long`` (2,048-token windows of long articles) | loglikelihood | token_perplexity, token_perplexity_late | ``{"context", "continuation", "n_tokens", "late", ...}`` |

``wiki_long`` is where a constant-memory conversion must remember: a window + sinks + memory of a few hundred pairs
cannot hold 2,048 tokens, so unlike ``wiki_ppl`` (512-token windows, which such a recipe sees whole) it tells the
conversion from the base. Each window is two requests: its first half after nothing, and its second half after the
first; ``token_perplexity`` pools every token, ``token_perplexity_late`` only the second halves (positions >= 1,024).
Its ``process_results`` is ``long_ppl.py`` beside the YAML (written with it).

The passkey probe is scored by teacher forcing, not by ``generate``: ``acc`` is 1 when every token of the key is
the model's argmax given the prompt and the key's earlier tokens, which is exactly "greedy decoding writes the
key", for one forward pass per item and without relying on a generation cache.

The YAML templates next to this file (``<task>.yaml``) hold ``$data_file``; ``write_task_yamls`` renders them with
the absolute path of each data file so ``lm_eval.tasks.TaskManager(include_path=...)`` (or ``lm_eval --include_path``)
finds them.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

TEMPLATE_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class LocalTask:
    """One shipped task: its data file (a ``DataPaths`` attribute) and the metric that summarizes it."""

    name: str
    data_attr: str
    metric: str
    higher_is_better: bool


LOCAL_TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in (
        LocalTask("wiki_ppl", "heldout_ppl", "word_perplexity", False),
        LocalTask("wiki_nextsent", "nextsent", "acc_norm", True),
        LocalTask("passkey_1k", "passkey_1k", "acc", True),
        LocalTask("passkey_2k", "passkey_2k", "acc", True),
        LocalTask("passkey_4k", "passkey_4k", "acc", True),
        LocalTask("passkey_multi", "passkey_multi", "acc", True),
        LocalTask("wiki_long", "long_ppl", "token_perplexity", False),
    )
}

# ---------------------------------------------------------------------------------------------- sentences

_ABBREV = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "no", "ca", "c", "e.g", "i.e", "etc", "al", "fig",
           "approx", "u.s", "u.k", "gen", "col", "lt", "prof", "rev", "inc", "co", "ltd", "mt", "ft", "vol"}
_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences at ``. ! ?`` followed by space and a capital, digit or quote.

    A period after a known abbreviation or a single letter (an initial: "J. S. Bach") is not a boundary.
    """
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        nxt = text[m.end(): m.end() + 1]
        if not nxt or not (nxt.isupper() or nxt.isdigit() or nxt in "\"'("):
            continue
        word = re.split(r"\s", text[start: m.start()])[-1].lower().lstrip("(\"'")
        if text[m.start()] == "." and (word in _ABBREV or (len(word) == 1 and word.isalpha())):
            continue
        out.append(text[start: m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _usable(sentence: str) -> bool:
    # Very short or very long "sentences" are mostly splitting accidents (lists, run-ons).
    return 40 <= len(sentence) <= 250 and sentence[-1] in ".!?\"'"


def nextsent_items(articles: list[tuple[str, str]], n_items: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """Four-way next-sentence items: 3 consecutive sentences, the true 4th plus 3 from OTHER articles.

    Items are spread evenly over ``articles`` (taken round-robin, at seeded random places that do not overlap, so
    a short article gives fewer); the answer's position among the choices is seeded random.
    """
    if len(articles) < 4:
        raise ValueError(f"nextsent_items: needs at least 4 articles for 3 foreign distractors, got {len(articles)}")
    rng = random.Random(seed)
    sents = [split_sentences(body.replace("\n\n", " ")) for _, body in articles]
    pools = [[s for s in ss if _usable(s)] for ss in sents]
    places: list[list[int]] = []  # per article: non-overlapping starts of 4 usable consecutive sentences
    for ss in sents:
        starts = [i for i in range(len(ss) - 3) if all(_usable(s) for s in ss[i: i + 4])]
        rng.shuffle(starts)
        taken: list[int] = []
        for i in starts:
            if all(abs(i - j) >= 4 for j in taken):
                taken.append(i)
        places.append(taken)
    chosen: list[tuple[int, int]] = []
    for rank in range(max(map(len, places), default=0)):
        chosen += [(a, p[rank]) for a, p in enumerate(places) if rank < len(p)]
    if len(chosen) < n_items:
        raise ValueError(f"nextsent_items: only {len(chosen)} of {n_items} items fit in the given articles")
    items: list[dict[str, Any]] = []
    for a, i in sorted(chosen[:n_items]):
        others = [s for b, pool in enumerate(pools) if b != a for s in pool]
        distractors = rng.sample(others, 3)
        label = rng.randrange(4)
        choices = distractors[:label] + [sents[a][i + 3]] + distractors[label:]
        items.append({"title": articles[a][0], "context": " ".join(sents[a][i: i + 3]), "choices": choices,
                      "label": label})
    return items


# ---------------------------------------------------------------------------------------------- passkey

# Filler: a handful of short, plain, number-free sentences repeated. SmolLM2-135M finds a key stated in such a
# haystack; in natural prose (held-out news of the gensim wheel, tried in December 2026) it misses half of them at
# 2K tokens, so a probe built on prose could not show what a conversion loses. The key is the only number there.
_FILLER = ("The sea is calm. The road is long. The day is warm. On we go. Back and forth again. ")
_FILLER_CHARS_PER_TOKEN = 3.5  # SmolLM2 tokenizer on _FILLER (measured; the slow test checks the sizes)
# The question is stated before the text too: the model then marks the key as it reads it. Asked at the end only,
# SmolLM2 retrieves 0.60 of the 2K items; asked first and last, 0.95 (greedy generation, December 2026).
_PROMPT_HEAD = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                "memorize it. I will ask you: what is the pass key?\n\n")
_QUESTION = "\n\nWhat is the pass key? The pass key is #"
# Keys are written ``#12345``, and the target is the five digits after the ``#`` that ends the prompt. Written
# ``... is 12345``, the target began with a bare space token (SmolLM2 splits digits, so `` 12345`` is ``" "`` then
# five digits), and its greedy match was mostly a contest between ``" "`` and ``" the"``: the 4K items of the main
# job's conversion had all five digits right and 0 of 20 exact (December 2026). The ``#`` leaves nothing but the key
# to predict, for the base as for a conversion.


def _haystack(n_tokens: int, n_needles: int) -> tuple[list[str], int]:
    """Filler sentences for a prompt of about ``n_tokens`` tokens that also holds ``n_needles`` needle sentences."""
    if n_tokens < 200:
        raise ValueError(f"passkey_items: n_tokens={n_tokens} leaves no room for a haystack (use >= 200)")
    filler_sents = split_sentences(_FILLER)
    overhead = len(_PROMPT_HEAD) + len(_QUESTION) + 80 * n_needles
    n_sents = max(2, int((n_tokens * _FILLER_CHARS_PER_TOKEN - overhead) / (len(_FILLER) / len(filler_sents))))
    return [filler_sents[i % len(filler_sents)] for i in range(n_sents)], n_sents


def _depths(rng: random.Random, n_items: int) -> list[float]:
    """One depth per item, stratified over [0.05, 0.95] (item i in the i-th of n equal strata), then shuffled."""
    depths = [0.05 + 0.9 * (i + rng.random()) / n_items for i in range(n_items)]
    rng.shuffle(depths)
    return depths


def passkey_items(n_tokens: int, n_items: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Passkey-in-a-haystack items of about ``n_tokens`` tokens (SmolLM2 tokenizer), keys of 5 digits.

    The haystack repeats neutral sentences; the sentence stating the key sits at a depth (fraction of the filler
    before it) stratified over 0.05 ... 0.95, so every part of the context is probed; the prompt ends with the
    question, which ends in ``#`` (keys are written ``#12345``), and the target is the key's five digits.
    """
    rng = random.Random(seed * 1_000_003 + n_tokens)
    haystack, n_sents = _haystack(n_tokens, 1)
    items = []
    for depth in _depths(rng, n_items):
        key = str(rng.randrange(10_000, 100_000))
        at = round(depth * n_sents)
        needle = f"The pass key is #{key}. Remember it. #{key} is the pass key."
        text = " ".join(haystack[:at] + [needle] + haystack[at:])
        items.append({"prompt": _PROMPT_HEAD + text + _QUESTION, "target": key, "passkey": key,
                      "depth": round(at / n_sents, 3)})
    return items


_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")


def multikey_items(n_tokens: int = 1024, n_keys: int = 4, n_items: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Multi-key passkey items: ``n_keys`` named keys (``the red pass key is #12345``) at spread depths; the question
    asks for one of them (its depth stratified over the items), the target is that key.
    """
    if not 2 <= n_keys <= len(_COLOURS):
        raise ValueError(f"multikey_items: n_keys={n_keys} must be between 2 and {len(_COLOURS)}")
    rng = random.Random(seed * 1_000_003 + n_tokens + 7919 * n_keys)
    haystack, n_sents = _haystack(n_tokens, n_keys)
    items = []
    for depth in _depths(rng, n_items):
        names = rng.sample(_COLOURS, n_keys)
        keys = [str(k) for k in rng.sample(range(10_000, 100_000), n_keys)]
        asked = rng.randrange(n_keys)
        # The asked key at the item's depth; the others at random other places, never the same sentence slot.
        slots = {round(depth * n_sents)}
        while len(slots) < n_keys:
            slots.add(rng.randrange(1, n_sents))
        order = sorted(slots - {round(depth * n_sents)})
        rng.shuffle(order)
        at = {asked: round(depth * n_sents)} | {i: order.pop() for i in range(n_keys) if i != asked}
        by_slot = {at[i]: f"The {names[i]} pass key is #{keys[i]}. Remember it." for i in range(n_keys)}
        parts = []
        for j, sent in enumerate(haystack):
            if j in by_slot:
                parts.append(by_slot[j])
            parts.append(sent)
        head = (f"There are {n_keys} important pieces of information hidden inside a lot of irrelevant text. Find them and "
            f"memorize them. I will ask you: what is the {{asked}} pass key?\n\n")
        question = f"\n\nWhat is the {names[asked]} pass key? The {names[asked]} pass key is #"
        items.append({"prompt": head.format(asked=names[asked]) + " ".join(parts) + question, "target": keys[asked],
                      "passkey": keys[asked], "asked": names[asked], "keys": dict(zip(names, keys)),
                      "depth": round(at[asked] / n_sents, 3)})
    return items

# ---------------------------------------------------------------------------------------------- long windows

LONG_WINDOW = 2048
LONG_SPLIT = 1024


def long_ppl_items(articles: list[tuple[str, str]], tokenizer: Any, window: int = LONG_WINDOW,
                   split: int = LONG_SPLIT, per_article: int = 4) -> list[dict[str, Any]]:
    """Two loglikelihood requests per ``window``-token window of the long articles (token windows, not characters).

    Each article gives its first ``per_article`` non-overlapping windows (an article shorter than one window gives
    none). Window 0 of every article comes first, then window 1, ...: a limit still covers many articles. Per window,
    rows ``{"context": "", "continuation": tokens [0, split)}`` and ``{"context": tokens [0, split), "continuation":
    tokens [split, window), "late": true}``, with ``n_tokens`` the continuation's token count (what the perplexity
    divides by). Rows carry ``title``, ``window`` and ``late``; the two rows of a window are adjacent.
    """
    if not 0 < split < window:
        raise ValueError(f"long_ppl_items: split={split} must lie inside the window ({window} tokens)")
    per: list[list[tuple[str, list[int]]]] = []
    for title, body in articles:
        ids = tokenizer(re.sub(r"\s+", " ", body).strip(), add_special_tokens=False).input_ids
        per.append([(title, ids[i * window:(i + 1) * window]) for i in range(min(per_article, len(ids) // window))])
    rows: list[dict[str, Any]] = []
    for w in range(max(map(len, per), default=0)):
        for windows in per:
            if w >= len(windows):
                continue
            title, ids = windows[w]
            head, tail = tokenizer.decode(ids[:split]), tokenizer.decode(ids[split:])
            rows.append({"title": title, "window": w, "late": False, "context": "", "continuation": head,
                         "n_tokens": split})
            rows.append({"title": title, "window": w, "late": True, "context": head, "continuation": tail,
                         "n_tokens": window - split})
    if not rows:
        raise ValueError(f"long_ppl_items: no article has {window} tokens")
    return rows


# ---------------------------------------------------------------------------------------------- YAMLs


def write_task_yamls(out_dir: Path, data: Any) -> list[Path]:
    """Render every task template of this package into ``out_dir`` with ``data`` (a ``DataPaths``) substituted.

    Args:
        out_dir: directory to write (created).
        data: object with the attributes named by ``LocalTask.data_attr`` (absolute paths).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task in LOCAL_TASKS.values():
        template = Template((TEMPLATE_DIR / f"{task.name}.yaml").read_text())
        # json.dumps quotes the path, which is valid YAML whatever characters the path holds.
        text = template.substitute(data_file=json.dumps(str(getattr(data, task.data_attr))))
        path = out_dir / f"{task.name}.yaml"
        path.write_text(text)
        written.append(path)
    for helper in TEMPLATE_DIR.glob("*.py"):  # the tasks' process_results (``!function``), read beside the YAMLs
        (out_dir / helper.name).write_text(helper.read_text())
        written.append(out_dir / helper.name)
    return written


def tasks_written(out_dir: Path) -> bool:
    """True when ``out_dir`` holds a YAML for every local task and every helper module."""
    return (all((Path(out_dir) / f"{t}.yaml").is_file() for t in LOCAL_TASKS)
            and all((Path(out_dir) / p.name).is_file() for p in TEMPLATE_DIR.glob("*.py")))
