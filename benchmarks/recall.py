"""Recall benchmark: what keeps passkey retrieval after linearization, at the main job's token budget.

Each row is a model (the base, a training-free conversion, or ``examples/demo-lora.yaml``'s recipe with one change) and
gets every column, on the demo's full local sets (``surgery fetch-demo`` builds them):

- passkey accuracy at 1K, 2K and 4K tokens (20 items each, depths stratified over the context) and on the 4-key
  variant (20 items, ~1K tokens): greedy exact match by teacher forcing (every key token is the argmax);
- held-out token perplexity on the 20 held-out 512-token windows, all positions and positions >= 256 (a window +
  sinks + memory of 512 pairs sees such a window whole: these columns cannot tell it from the base);
- long-context token perplexity on 2,048-token windows of the long held-out articles (``wiki_long``'s windows), all
  positions and positions >= 1,024: where a constant-memory conversion must remember;
- next-sentence accuracy (acc_norm, lm-eval's definition) on all 100 items;
- decode memory per sequence after a 4K-token prefill: the bytes of every layer's cache (states, window, sinks,
  memory; keys and values of softmax layers), batch 1, fp32.

    python benchmarks/recall.py [--rows base,swa64,...] [--out runs/bench-recall]

Not part of CI. Rows are resumable: a finished row's ``<out>/<row>/row.json`` is reused, and a recovered row's
``recover/`` reloads its finished stages instead of training. Rows whose name ends in ``_inf`` reuse another row's
recovered weights and change an option at inference only (no training). Prints the table and writes
``results.md``/``results.json``. On 2 CPU cores one row's evaluation takes about 8 minutes and a recovery about 7.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recovery import heldout_windows, token_ppl  # noqa: E402
from surgery import demo  # noqa: E402
from surgery.cache import MixerCacheLayer  # noqa: E402
from surgery.convert import convert  # noqa: E402
from surgery.mixer import Mixer  # noqa: E402
from surgery.plan import load_plan  # noqa: E402
from surgery import recover  # noqa: E402  (resolves the recover verb's inputs from a plan)

LIGER = "liger_attention"


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- the measures


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def passkey_acc(model: torch.nn.Module, tokenizer: Any, items: list[dict[str, Any]]) -> float:
    """Share of items whose every target token is the argmax given the prompt and the earlier target tokens."""
    hits = 0
    with torch.no_grad():
        for it in items:
            ctx = tokenizer(it["prompt"])["input_ids"]
            tgt = tokenizer(it["target"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + tgt], device=_device(model))
            # Only the logits that predict the key: the LM head over 4K positions costs a fifth of the forward.
            logits = model(ids, logits_to_keep=len(tgt) + 1).logits[0, :-1]
            hits += int(torch.equal(logits.argmax(-1).cpu(), torch.tensor(tgt)))
    return hits / len(items)


def nextsent_acc(model: torch.nn.Module, tokenizer: Any, items: list[dict[str, Any]]) -> float:
    """lm-eval's ``acc_norm``: the choice with the highest log-likelihood per byte (4 choices, one batch per item)."""
    hits = 0
    with torch.no_grad():
        for it in items:
            ctx = tokenizer(it["context"])["input_ids"]
            conts = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in it["choices"]]
            seqs = [ctx + c for c in conts]
            n = max(map(len, seqs))
            ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs], device=_device(model))  # right padding
            logp = model(ids).logits.float().log_softmax(-1).cpu()
            scores = []
            for i, (c, choice) in enumerate(zip(conts, it["choices"])):
                pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c))
                ll = logp[i, pos, torch.tensor(c)].sum().item()
                scores.append(ll / len((" " + choice).encode()))
            hits += int(max(range(4), key=scores.__getitem__) == it["label"])
    return hits / len(items)


def long_windows(data: demo.DataPaths, tokenizer: Any, n: int | None = None) -> list[torch.Tensor]:
    """``wiki_long``'s 2,048-token windows (its two rows per window joined), as token ids ``[1 + 2048]`` after the
    EOS token lm-eval puts before a request with no context."""
    rows = _rows(data.long_ppl)
    out = []
    for head, tail in zip(rows[0::2], rows[1::2]):
        ids = tokenizer(head["continuation"] + tail["continuation"], add_special_tokens=False)["input_ids"]
        out.append(torch.tensor([tokenizer.eos_token_id] + ids[: head["n_tokens"] + tail["n_tokens"]]))
    return out[:n]


def long_ppl(model: torch.nn.Module, windows: list[torch.Tensor], split: int = 1024) -> dict[str, float]:
    """Token perplexity over ``windows``: every position, and positions >= ``split`` (what must be remembered)."""
    nll = {"all": 0.0, "late": 0.0}
    count = {"all": 0, "late": 0}
    with torch.no_grad():
        for ids in windows:
            ids = ids.to(_device(model))
            logits = model(ids[None]).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
            nll["all"] += loss.sum().item()
            nll["late"] += loss[split:].sum().item()
            count["all"] += loss.numel()
            count["late"] += loss[split:].numel()
    return {"long_ppl": math.exp(nll["all"] / count["all"]), "long_ppl_late": math.exp(nll["late"] / count["late"]),
            "n_long": len(windows)}


def decode_bytes(model: torch.nn.Module, tokenizer: Any, item: dict[str, Any]) -> int:
    """Bytes of the generation cache for one sequence after prefilling ``item``'s prompt (about 4K tokens)."""
    from transformers import DynamicCache

    ids = torch.tensor([tokenizer(item["prompt"])["input_ids"]], device=_device(model))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    total = 0
    for layer in cache.layers:
        if isinstance(layer, MixerCacheLayer):
            tensors = list(layer.states or ()) + [t for t in (layer.keys, layer.values, layer.valid) if t is not None]
            tensors += list(layer.aux.values())
        else:
            tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def measure(model: torch.nn.Module, tokenizer: Any, data: demo.DataPaths, windows: list[torch.Tensor]) -> dict:
    t0 = time.perf_counter()
    row: dict[str, Any] = {}
    for name, path in (("passkey_1k", data.passkey_1k), ("passkey_2k", data.passkey_2k),
                       ("passkey_4k", data.passkey_4k), ("passkey_multi", data.passkey_multi)):  # fmt: skip
        row[name] = passkey_acc(model, tokenizer, _rows(path))
        print(f"  {name} {row[name]:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    row["n_passkey"] = len(_rows(data.passkey_1k))
    mixers = [m for m in model.modules() if isinstance(m, Mixer)]
    for m in mixers:
        m.reset_stats()
    row.update(token_ppl(model, windows))
    row.update(long_ppl(model, long_windows(data, tokenizer)))
    counts = [m.stats()["tokens_per_memory"] for m in mixers if "tokens_per_memory" in m.stats()]
    if counts:  # MoM: (token, choice) pairs each memory of each layer got on the held-out windows
        row["tokens_per_memory"] = counts
    row["nextsent"] = nextsent_acc(model, tokenizer, _rows(data.nextsent))
    row["n_nextsent"] = len(_rows(data.nextsent))
    row["decode_bytes_4k"] = decode_bytes(model, tokenizer, _rows(data.passkey_4k)[0])
    row["eval_s"] = round(time.perf_counter() - t0, 1)
    return row


# ---------------------------------------------------------------------------------------------- the rows


def _liger_options(raw: dict[str, Any], **update: Any) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for rule in raw["convert"]:
        if rule["mixer"] == LIGER:
            rule["options"] = {**rule.get("options", {}), **update}
    return raw


def _mom(raw: dict[str, Any]) -> dict[str, Any]:
    """The demo's recipe and budget with examples/mom.yaml's conversion (liger_attention over MoM)."""
    raw = copy.deepcopy(raw)
    raw["convert"] = yaml.safe_load(Path("examples/mom.yaml").read_text())["convert"]
    return raw


def _main_job(tokens: int | None = None, **stage: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """examples/demo.yaml (the main job: window + sinks + memory, LoRA distilled at 2,048 tokens), its recovery
    budget set to ``tokens`` and its stage options updated with ``stage``."""

    def plan(raw: dict[str, Any]) -> dict[str, Any]:
        main = yaml.safe_load(Path("examples/demo.yaml").read_text())
        main["model"] = raw["model"]
        main["recover"]["data"]["source"] = raw["recover"]["data"]["source"]
        lora = main["recover"]["stages"]["lora"]
        lora.update(stage)
        if tokens is not None:
            lora["tokens"] = tokens
        return main

    return plan


def _training_free(mixer: str, **options: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def plan(raw: dict[str, Any]) -> dict[str, Any]:
        raw = copy.deepcopy(raw)
        raw["convert"] = [{"layers": "all", "mixer": mixer, "options": options, "weights": "copy_qkvo"}]
        raw.pop("recover", None)
        return raw

    return plan


def _keep_softmax(layers: list[int]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The main job's plan with ``layers`` left as the base's softmax attention."""

    def plan(raw: dict[str, Any]) -> dict[str, Any]:
        raw = copy.deepcopy(raw)
        n = 30
        for rule in raw["convert"]:
            rule["layers"] = [i for i in range(n) if i not in layers]
        return raw

    return plan


def evenly_spaced(k: int, n: int = 30) -> list[int]:
    """``k`` layers at the middles of ``k`` equal parts of ``n``."""
    return [int((i + 0.5) * n / k) for i in range(k)]


#: Rankings of ``surgery select`` (the JSON it writes beside the hybrid plan) and the command that made each.
RANKINGS = {
    "lora": ("benchmarks/results/select-smollm2.json", "surgery select examples/demo-lora.yaml --keep 4 -o ..."),
    # The main job's own conversion, on long calibration chunks: window + sinks + memory lose only what lies
    # beyond the window, so the KL measures each layer's long-range dependence.
    "long": ("benchmarks/results/select-smollm2-long.json",
             "surgery select examples/demo.yaml --keep 4 --tokens 4096 --seq-len 2048 -o ..."),
}


def _selected(k: int, ranking: str = "lora") -> list[int]:
    path, command = RANKINGS[ranking]
    if not Path(path).exists():
        raise SystemExit(f"{path} is missing: run `{command}` and copy its .json there")
    return sorted(json.loads(Path(path).read_text())["ranking"][:k])


#: row name -> (plan transform of examples/demo-lora.yaml, inference-time option changes, the row whose recovery it
#: reuses, layers swapped back to the base's softmax attention after recovery). A plan without ``recover`` is
#: training-free.
Row = tuple[Callable[[dict], dict] | None, dict[str, Any], str | None, Callable[[], list[int]] | None]
_same = lambda raw: raw  # noqa: E731
_MEM128 = _training_free(LIGER, window=64, sinks=4, memory=128, w_swa=1.0, w_rec=0.0)
_MEM512 = _training_free(LIGER, window=64, sinks=4, memory=512, w_swa=1.0, w_rec=0.0)
ROWS: dict[str, Row] = {
    "base": (None, {}, None, None),
    "swa64": (_training_free("swa", window=64), {}, None, None),
    "swa64_sinks4": (_training_free("swa", window=64, sinks=4), {}, None, None),
    # Window + sinks + retrieval memory, no training: the recurrent branch only scores pairs (its weight is 0).
    "swa64_sinks4_mem64": (_training_free(LIGER, window=64, sinks=4, memory=64, w_swa=1.0, w_rec=0.0), {}, None,
                           None),
    "swa64_sinks4_mem128": (_MEM128, {}, None, None),
    "default": (_same, {}, None, None),
    "default_sinks4_inf": (_same, {"sinks": 4}, "default", None),
    "default_mem64_inf": (_same, {"sinks": 4, "memory": 64}, "default", None),
    "default_mem128_inf": (_same, {"sinks": 4, "memory": 128}, "default", None),
    "mom": (_mom, {}, None, None),
    "sinks4": (lambda raw: _liger_options(raw, sinks=4), {}, None, None),
    "memory64": (lambda raw: _liger_options(raw, sinks=4, memory=64), {}, None, None),
    "memory128": (lambda raw: _liger_options(raw, sinks=4, memory=128), {}, None, None),
    "wdrop": (lambda raw: _liger_options(raw, sinks=4, window_dropout=0.25), {}, None, None),
    "wdrop_mem64_inf": (lambda raw: _liger_options(raw, sinks=4, window_dropout=0.25), {"memory": 64}, "wdrop",
                        None),
    # Hybrids: the default recovery with K layers given back their base softmax attention (no training), ...
    "hybrid2_selected_inf": (_same, {}, "default", lambda: _selected(2)),
    "hybrid2_even_inf": (_same, {}, "default", lambda: evenly_spaced(2)),
    "hybrid4_selected_inf": (_same, {}, "default", lambda: _selected(4)),
    "hybrid4_even_inf": (_same, {}, "default", lambda: evenly_spaced(4)),
    # ... and recovered as hybrids.
    "hybrid2_selected": (lambda raw: _keep_softmax(_selected(2))(raw), {}, None, None),
    "hybrid2_even": (_keep_softmax(evenly_spaced(2)), {}, None, None),
    "hybrid4_selected": (lambda raw: _keep_softmax(_selected(4))(raw), {}, None, None),
    "hybrid4_even": (_keep_softmax(evenly_spaced(4)), {}, None, None),
    # Training-free hybrids: K layers kept as softmax, the rest window + sinks + memory (the swa64_sinks4_mem128 row).
    "hybrid2_selected_mem128": (lambda raw: _keep_softmax(_selected(2))(_MEM128(raw)), {}, None, None),
    "hybrid2_even_mem128": (lambda raw: _keep_softmax(evenly_spaced(2))(_MEM128(raw)), {}, None, None),
    "hybrid4_selected_mem128": (lambda raw: _keep_softmax(_selected(4))(_MEM128(raw)), {}, None, None),
    "hybrid4_even_mem128": (lambda raw: _keep_softmax(evenly_spaced(4))(_MEM128(raw)), {}, None, None),
    # ... with the layers selected on the main job's plan at 2048-token calibration chunks.
    "hybrid2_longsel_mem128": (lambda raw: _keep_softmax(_selected(2, "long"))(_MEM128(raw)), {}, None, None),
    "hybrid4_longsel_mem128": (lambda raw: _keep_softmax(_selected(4, "long"))(_MEM128(raw)), {}, None, None),
    # A larger memory: 512 pairs per key/value head, alone and around the four selected softmax layers.
    "swa64_sinks4_mem512": (_MEM512, {}, None, None),
    "hybrid4_longsel_mem512": (lambda raw: _keep_softmax(_selected(4, "long"))(_MEM512(raw)), {}, None, None),
    "hybrid4_even_mem512": (lambda raw: _keep_softmax(evenly_spaced(4))(_MEM512(raw)), {}, None, None),
    # Window against memory at a fixed count of visible keys (docs/recall.md), training-free, 4 sinks, w_rec 0.
    **{f"w{w}_m{m}": (_training_free(LIGER, window=w, sinks=4, memory=m, w_swa=1.0, w_rec=0.0), {}, None, None)
       for w, m in ((64, 768), (64, 1024), (128, 448), (128, 512), (192, 384), (256, 320), (384, 192), (448, 128))},
    # The main job (examples/demo.yaml: window 384 + 4 sinks + 192 pairs since 2026-12-08) recovered with LoRA
    # distilled from the base at 2,048 tokens (20K tokens), and the same with 5x the tokens.
    "main": (_main_job(), {}, None, None),
    "main_100k": (_main_job(102400), {}, None, None),
}


def build(name: str, raw: dict[str, Any], base: torch.nn.Module, tokenizer: Any, out: Path) -> tuple[Any, dict]:
    """The row's model, recovered (or reloaded) as its plan says, with inference-time changes applied."""
    transform, at_inference, reuse, softmax_layers = ROWS[name]
    if transform is None:
        return base, {"plan": "base"}
    plan_raw = transform(raw)
    plan_raw["output"] = str(out / (reuse or name))
    plan = load_plan(plan_raw)
    model, info = convert(plan), {"plan": plan_raw["convert"]}
    if plan.recover is not None:
        t0 = time.perf_counter()
        result = recover(model, plan, tokenizer=tokenizer, out_dir=out / (reuse or name) / "recover",
                         teacher_model=base)  # fmt: skip
        model = result.model
        info.update(train_tokens=result.tokens, steps=result.steps, recover_s=round(time.perf_counter() - t0, 1))
    if at_inference:
        for m in model.modules():
            if getattr(m, "name", None) == LIGER and hasattr(m, "options"):
                m.options = m.options.model_copy(update=at_inference)
        info["at_inference"] = at_inference
    if softmax_layers is not None:
        keep = softmax_layers()
        for i in keep:  # LoRA targets only the attention projections: the rest of the layer is the base's
            model.model.layers[i].self_attn = copy.deepcopy(base.model.layers[i].self_attn)
        info["softmax_layers"] = keep
    return model.eval(), info


def table(rows: dict[str, dict[str, Any]], base: dict[str, Any] | None) -> str:
    head = ["row", "passkey 1K", "2K", "4K", "multi-key", "token ppl", "x base", "ppl pos>=256", "x base",
            "long ppl", "x base", "long ppl pos>=1024", "x base", "next-sent acc", "decode MB/seq @4K"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        n, m = r.get("n_passkey", "?"), r.get("n_nextsent", "?")
        cells = [name] + [f"{r[k]:.2f}" for k in ("passkey_1k", "passkey_2k", "passkey_4k", "passkey_multi")]
        for k in ("ppl", "ppl_pos256", "long_ppl", "long_ppl_late"):
            if k not in r:  # a row measured before the long-context columns existed
                cells += ["–", "–"]
                continue
            cells += [f"{r[k]:.2f}", f"{r[k] / base[k]:.3f}" if base and k in base else "–"]
        cells += [f"{r['nextsent']:.2f}", f"{r['decode_bytes_4k'] / 2**20:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    w = next((r["n_long"] for r in rows.values() if "n_long" in r), "?")
    lines.append(f"\nn = {n} items per passkey column, {m} next-sentence items, {w} long windows of 2,048 tokens.")
    return "\n".join(lines) + "\n"


def run_rows(names: list[str], plan: Path, out: Path) -> None:
    """Build, recover and measure each row of ``names`` into ``<out>/<row>/row.json`` (finished rows are kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = yaml.safe_load(plan.read_text())
    model_dir, data = demo.prepare_demo()
    raw["model"] = str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(device)
    windows = heldout_windows(data, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        saved = out / name / "row.json"
        if saved.exists():
            print(f"[recall] {name}: reusing {saved}", flush=True)
            continue
        print(f"[recall] {name}", flush=True)
        torch.manual_seed(0)
        model, info = build(name, raw, base, tokenizer, out)
        model = model.to(device)
        row = info | measure(model, tokenizer, data, windows)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(row, indent=1, default=str))
        print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
        del model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", default="examples/demo-lora.yaml")
    ap.add_argument("--rows", default="base,swa64,swa64_sinks4,default,default_sinks4_inf,sinks4",
                    help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--out", default="runs/bench-recall")
    args = ap.parse_args()
    names = [r for r in args.rows.split(",") if r]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")

    out = Path(args.out)
    run_rows(names, Path(args.plan), out)
    rows = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/row.json"))}
    order = [n for n in ROWS if n in rows]
    rows = {n: rows[n] for n in order}
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "plan": args.plan}  # fmt: skip
    (out / "results.json").write_text(json.dumps(meta | {"rows": rows}, indent=1, default=str))
    md = table(rows, rows.get("base"))
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
