"""Training text for the recovery stage: read documents, tokenize, pack into fixed-length chunks.

Sources: a local ``.txt`` file (one document), a ``.jsonl`` / ``.json`` file (one record per line / a list), a
directory of those (sorted by name), or a Hugging Face dataset name (``datasets.load_dataset``). A record is either
plain text (``{"text": ...}``, loss on every token) or an instruction pair (``instruction``, optional ``input``,
``output``), laid out with the Alpaca template with the loss on the response only.

Packing follows Liger (liger.md §4): every document ends with EOS, all documents are concatenated in source order
and cut into ``seq_len``-token chunks; the tail shorter than one chunk is dropped. No padding, so no attention mask
is needed and recurrent mixers see no padded positions. The order is the source order: shuffling is the sampler's
job (seeded by the Trainer), which is what makes a resumed run replay the same batches.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from surgery.errors import DataError
from surgery.recovery.spec import DataSpec

log = logging.getLogger("surgery.recover")


IGNORE = -100  # label of tokens that carry no loss (the prompt of an instruction pair)
SUFFIXES = (".txt", ".jsonl", ".json")

# The Stanford Alpaca prompt format (the layout Liger trains on), with and without an input field.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class PackedChunks(Dataset):
    """Fixed-length training chunks. Item ``i`` is ``{"input_ids": [L], "labels": [L]}`` (int64)."""

    def __init__(self, input_ids: Tensor, labels: Tensor) -> None:
        self.input_ids = input_ids  # [N, L]
        self.labels = labels  # [N, L], IGNORE where no loss

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(SUFFIXES)


def _read_file(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        yield from _read_text_file(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                        "recovery reads .txt, .jsonl and .json text files") from None  # fmt: skip


def _read_text_file(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, record)`` pairs; ``where`` names the file and line for error messages."""
    if path.suffix == ".txt":
        yield str(path), {"text": path.read_text(encoding="utf-8")}
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{n}", json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{n}: not a JSON object ({exc.msg})") from None
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file must hold a list of records")
        for n, row in enumerate(rows):
            yield f"{path}[{n}]", row
    else:
        raise DataError(f"recover.data.source: {path} is not a .txt, .jsonl or .json file")


def read_records(data: DataSpec) -> list[tuple[str, dict[str, Any]]]:
    """The records of ``data.source`` in source order (at most ``data.max_records``)."""
    source = data.source
    path = Path(source).expanduser()
    if path.exists():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise DataError(f"recover.data.source: directory {path} holds no .txt, .jsonl or .json file")
        rows = (row for f in files for row in _read_file(f))
    elif _looks_local(source):
        raise DataError(f"recover.data.source: {path} does not exist")
    else:
        rows = _hub_rows(data)
    out = []
    for where, row in rows:
        if data.max_records is not None and len(out) >= data.max_records:
            break
        out.append((where, row))
    if not out:
        raise DataError(f"recover.data.source: {source} holds no records")
    return out


def _hub_rows(data: DataSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_dataset(data.source, data.name, split=data.split)
    except Exception as exc:  # offline, unknown name, missing config: all end the same way for the user
        raise DataError(
            f"recover.data.source: '{data.source}' is not a local file and could not be loaded with "
            f"datasets.load_dataset ({type(exc).__name__}: {exc})"
        ) from None
    for n, row in enumerate(ds):
        yield f"{data.source}[{data.split}][{n}]", dict(row)


def _eos(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id: packing needs it to separate documents")
    return int(eos)


def tokenize_records(records: Sequence[tuple[str, dict[str, Any]]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids and labels of all records, concatenated in order (each document closed by EOS).

    Text records are tokenized with the tokenizer's own special tokens (BOS where it adds one) and learn every
    token; instruction records learn the response and its EOS only.
    """
    eos = _eos(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    texts: list[str] = []  # consecutive text records, tokenized in batches (fast tokenizers parallelise)

    def flush() -> None:
        if texts:
            for doc in tokenizer(texts, add_special_tokens=True)["input_ids"]:
                doc = list(doc) if not doc or doc[-1] != eos else list(doc)[:-1]
                ids.extend(doc + [eos])
                labels.extend(doc + [eos])
            texts.clear()

    for where, row in records:
        if not isinstance(row, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
        if isinstance(row.get("text"), str):
            texts.append(row["text"])
            if len(texts) >= 512:
                flush()
        elif isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
            flush()
            extra = row.get("input") or ""
            template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
            prompt = tokenizer(template.format(instruction=row["instruction"], input=extra), add_special_tokens=True)
            answer = tokenizer(row["output"], add_special_tokens=False)
            p, a = list(prompt["input_ids"]), list(answer["input_ids"]) + [eos]
            ids.extend(p + a)
            labels.extend([IGNORE] * len(p) + a)
        else:
            raise DataError(
                f"{where}: a record needs 'text', or 'instruction' and 'output' (strings); it has keys {sorted(row)}"
            )
    flush()
    return ids, labels


def pack(ids: list[int], labels: list[int], seq_len: int, where: str = "the data") -> PackedChunks:
    """Cut the token stream into ``seq_len`` chunks; drop the short tail and chunks without any loss token."""
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"{where} has {len(ids)} tokens, fewer than one chunk of recover.data.seq_len={seq_len}")
    x = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    y = torch.tensor(labels[: n * seq_len], dtype=torch.long).view(n, seq_len)
    # The model shifts labels by one, so position 0's label is never scored: a chunk whose labels[1:] are all
    # IGNORE would give a 0/0 loss.
    keep = (y[:, 1:] != IGNORE).any(dim=1)
    if not bool(keep.any()):
        raise DataError(f"{where}: no chunk of {seq_len} tokens contains a token to learn")
    if not bool(keep.all()):
        log.info("dropped %d chunks without response tokens", int((~keep).sum()))
    return PackedChunks(x[keep].contiguous(), y[keep].contiguous())


def load_chunks(data: DataSpec, tokenizer: Any) -> PackedChunks:
    """Read, tokenize and pack ``data`` (deterministic: the same spec and tokenizer give the same chunks)."""
    records = read_records(data)
    ids, labels = tokenize_records(records, tokenizer)
    chunks = pack(ids, labels, data.seq_len, where=f"recover.data.source '{data.source}'")
    log.info(
        "data: %d records, %d tokens -> %d chunks of %d tokens", len(records), len(ids), len(chunks), data.seq_len
    )
    return chunks
