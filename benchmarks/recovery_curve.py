"""Quality against recovery tokens, on the GPU machine: the real SmolLM2-135M at 0.1M, 1M and 10M tokens.

Rows (each converted from the base as its example plan says, then recovered by LoRA distilled from the base at
2,048-token sequences, ``loss: distill``, with the plan's LoRA and learning rate):

- ``memory``: ``examples/demo.yaml``'s conversion (window + sinks + retrieval memory, the main job);
- ``liger_gla``: ``examples/demo-lora.yaml``'s conversion (Liger-GLA, window 64 + GLA, no memory).

Every point is measured on the demo's full held-out sets: token perplexity on all 41 ``wiki_long`` windows of 2,048
tokens (all positions, and positions >= 1,024), passkeys at 1K/2K/4K and the 4-key set (20 items each, teacher
forcing). Budget 0 is the conversion before recovery; the base is measured once.

Training text: the demo's Wikipedia training articles (about 0.4M SmolLM2 tokens), plus ``--teacher-tokens`` of
text the base model samples itself (temperature 1, top-p 0.95, from the openings of the training articles), since
10M tokens would otherwise repeat the articles 24 times. What was used is written into each row.

    python benchmarks/recovery_curve.py [--rows memory,liger_gla] [--tokens 0,100000,1000000,10000000]
        [--teacher-tokens 2000000] [--batch 8] [--out runs/bench-curve]

Rows are resumable (``<out>/<row>/<tokens>/point.json``), so the curve can be run over several device commands.
``--quick`` shrinks every set to one item for a smoke run on the CPU. Prints the table; writes
``<out>/results.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recall import _rows, long_ppl, long_windows, passkey_acc  # noqa: E402
from surgery import demo  # noqa: E402
from surgery import recover  # noqa: E402
from surgery.convert import convert  # noqa: E402
from surgery.plan import load_plan  # noqa: E402

ROWS = {"memory": "examples/demo.yaml", "liger_gla": "examples/demo-lora.yaml"}


def plan_for(row: str, tokens: int, model_dir: Path, data_file: Path, batch: int, out: Path) -> dict[str, Any]:
    """The row's example plan with its recovery set to ``tokens`` of distillation at 2,048 tokens on ``data_file``."""
    raw = yaml.safe_load(Path(ROWS[row]).read_text())
    main = yaml.safe_load(Path(ROWS["memory"]).read_text())
    raw = {"version": raw["version"], "model": str(model_dir), "dtype": "float32", "output": str(out),
           "convert": raw["convert"], "recover": copy.deepcopy(main["recover"])}  # fmt: skip
    raw["recover"]["data"] = {"source": str(data_file), "seq_len": 2048}
    lora = raw["recover"]["stages"]["lora"]
    lora.update(tokens=tokens, batch_size=batch, save_steps=max(50, tokens // (2048 * batch * 4)))
    if tokens == 0:
        raw.pop("recover")
    return raw


def teacher_text(base: torch.nn.Module, tokenizer: Any, articles: list[dict[str, Any]], tokens: int, out: Path,
                 length: int = 1024, batch: int = 64) -> Path:
    """``tokens`` of text sampled by ``base`` from article openings, as ``{"text"}`` rows (kept in ``out``)."""
    done = out / f"teacher-{tokens}.jsonl"
    if done.exists():
        return done
    device = next(base.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows, made = [], 0
    tokenizer.padding_side = "left"
    while made < tokens:
        picks = torch.randint(len(articles), (batch,), generator=gen).tolist()
        prompts = [" ".join(articles[i]["text"].split()[:24]) for i in picks]
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            ids = base.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=length,
                                min_new_tokens=length, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        rows += [{"text": p + t} for p, t in zip(prompts, texts)]
        made += batch * length
        print(f"[curve] teacher text: {made:,} / {tokens:,} tokens", flush=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(done)
    return done


def measure(model: torch.nn.Module, tokenizer: Any, data: demo.DataPaths, windows: list[torch.Tensor],
            items: int | None) -> dict[str, Any]:
    row: dict[str, Any] = dict(long_ppl(model, windows))
    for task in ("passkey_1k", "passkey_2k", "passkey_4k", "passkey_multi"):
        row[task] = passkey_acc(model, tokenizer, _rows(getattr(data, task))[:items])
    row["n_passkey"] = len(_rows(data.passkey_1k)[:items])
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="memory,liger_gla")
    ap.add_argument("--tokens", default="0,100000,1000000,10000000")
    ap.add_argument("--teacher-tokens", type=int, default=2_000_000)
    ap.add_argument("--batch", type=int, default=8, help="sequences of 2,048 tokens per optimizer step")
    ap.add_argument("--out", default="runs/bench-curve")
    ap.add_argument("--quick", action="store_true", help="one window and one item per set (a CPU smoke run)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, data = demo.prepare_demo()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(device)
    windows = long_windows(data, tokenizer, 1 if args.quick else None)
    items = 1 if args.quick else None
    results: dict[str, Any] = {"card": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                               "date": datetime.date.today().isoformat(), "rows": {}}  # fmt: skip
    base_file = out / "base.json"
    if not base_file.exists():
        base_file.write_text(json.dumps(measure(base, tokenizer, data, windows, items)))
    results["base"] = json.loads(base_file.read_text())
    train = _rows(data.train)
    sources = [data.train]
    if args.teacher_tokens > 0 and not args.quick:
        sources.append(teacher_text(base, tokenizer, train, args.teacher_tokens, out))
    mix = out / "train-mix.jsonl"
    mix.write_text("".join(Path(s).read_text() for s in sources))
    for row in args.rows.split(","):
        for tokens in [int(t) for t in args.tokens.split(",")]:
            point = out / row / str(tokens) / "point.json"
            if point.exists():
                results["rows"].setdefault(row, {})[tokens] = json.loads(point.read_text())
                continue
            print(f"[curve] {row} at {tokens:,} tokens", flush=True)
            torch.manual_seed(0)
            raw = plan_for(row, tokens, model_dir, mix, args.batch, out / row / str(tokens))
            plan = load_plan(raw)
            t0 = time.perf_counter()
            model = convert(plan, copy.deepcopy(base))
            teacher = args.teacher_tokens if len(sources) > 1 else 0
            info: dict[str, Any] = {"data": [str(s) for s in sources], "teacher_tokens": teacher}
            if plan.recover is not None:
                result = recover(model, plan, tokenizer=tokenizer, out_dir=out / row / str(tokens) / "recover",
                                 teacher_model=base)  # fmt: skip
                model = result.model
                info.update(trained_tokens=result.tokens, steps=result.steps)
            info["recover_s"] = round(time.perf_counter() - t0, 1)
            got = info | measure(model.to(device).eval(), tokenizer, data, windows, items)
            point.parent.mkdir(parents=True, exist_ok=True)
            point.write_text(json.dumps(got, indent=1))
            results["rows"].setdefault(row, {})[tokens] = got
            print(json.dumps(got), flush=True)
            del model
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "results.md").write_text(text)
    print(text)
    return 0


def table(results: dict[str, Any]) -> str:
    base = results["base"]
    head = ["row", "tokens", "long ppl (x base)", "pos >= 1,024 (x base)", "passkey 1K", "2K", "4K", "4-key"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(f"| base | – | {base['long_ppl']:.2f} | {base['long_ppl_late']:.2f} | {base['passkey_1k']:.2f} | "
                 f"{base['passkey_2k']:.2f} | {base['passkey_4k']:.2f} | {base['passkey_multi']:.2f} |")
    for row, points in results["rows"].items():
        for tokens, p in sorted(points.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {row} | {int(tokens):,} | {p['long_ppl']:.2f} ({p['long_ppl'] / base['long_ppl']:.3f}) | "
                         f"{p['long_ppl_late']:.2f} ({p['long_ppl_late'] / base['long_ppl_late']:.3f}) | "
                         f"{p['passkey_1k']:.2f} | {p['passkey_2k']:.2f} | {p['passkey_4k']:.2f} | "
                         f"{p['passkey_multi']:.2f} |")
    return "\n".join(lines) + f"\n\nCard: {results['card']}, {results['date']}; n = {base.get('n_long')} windows, " \
                              f"{base.get('n_passkey')} items per passkey set.\n"


if __name__ == "__main__":
    raise SystemExit(main())
