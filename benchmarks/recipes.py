"""Recipe search for recovery: which recovery recipe brings Liger-GLA SmolLM2 closest to base at a token budget.

Each variant converts SmolLM2-135M (every layer to ``liger_attention``), recovers with the variant's ``recover:``
section, and scores held-out Wikipedia perplexity directly (the demo's 512-token held-out windows; no lm-eval, so a
variant costs its training plus ~30 s). The winning recipe becomes the default of ``examples/demo.yaml``, and is then
confirmed with ``surgery run`` (lm-eval, next-sentence and passkey tasks included).

    python benchmarks/recipes.py --variants liger,at_qkvo --tokens 92160 --out runs/recipes [--threads 1]

Not part of CI. Prints one JSON line per variant and writes ``<out>/<variant>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery import demo  # noqa: E402
from surgery.convert import convert  # noqa: E402
from surgery.plan import load_plan  # noqa: E402
from surgery.recovery import recover  # noqa: E402

#: Recovery sections to compare. Token budgets are filled in from --tokens (split between stages as noted).
VARIANTS: dict[str, dict[str, Any]] = {
    # Liger's recipe (liger.md section 4): LoRA r=8 on q/k/v, lr 1e-3 constant.
    "liger": {"stages": ["lora"]},
    "lora_qkvo": {"stages": ["lora"], "lora": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
    "lora_qkvo_lr2e3_cos": {"stages": ["lora"], "lora": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                            "train": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 5}},
    # Attention transfer first (LoLCATs stage 1, teacher-forced MSE per layer), then LoRA; AT takes 1/4 of tokens.
    "at_qkvo": {"stages": ["attention_transfer", "lora"], "lora": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                "transfer": {"lr": 1e-3}, "at_share": 0.25},
    "at_qkvo_lr2e3": {"stages": ["attention_transfer", "lora"],
                      "lora": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                      "transfer": {"lr": 2e-3}, "train": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 5},
                      "at_share": 0.25},
    "at_qkvo_at5e3": {"stages": ["attention_transfer", "lora"],
                      "lora": {"targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                      "transfer": {"lr": 5e-3}, "at_share": 0.25},
    "at_qkvo_r16": {"stages": ["attention_transfer", "lora"],
                    "lora": {"r": 16, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                    "transfer": {"lr": 1e-3}, "at_share": 0.25},
}


def heldout_ppl(model: torch.nn.Module, windows: list[torch.Tensor]) -> dict[str, float]:
    """Perplexity over every token of each window, and over positions >= 256 only (beyond the SWA window)."""
    nll, n, nll_late, n_late = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(ids[None]).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
            nll, n = nll + loss.sum().item(), n + loss.numel()
            nll_late, n_late = nll_late + loss[255:].sum().item(), n_late + loss[255:].numel()
    return {"ppl": math.exp(nll / n), "ppl_pos256": math.exp(nll_late / n_late), "tokens": n}


def recover_section(name: str, tokens: int, train_file: Path) -> dict[str, Any]:
    raw = json.loads(json.dumps(VARIANTS[name]))
    share = raw.pop("at_share", 0.0)
    raw["data"] = {"source": str(train_file), "seq_len": 512}
    raw.setdefault("train", {})["tokens"] = int(tokens * (1 - share)) if share else tokens
    raw["train"]["save_steps"] = 10_000
    if "attention_transfer" in raw["stages"]:
        raw.setdefault("transfer", {})["tokens"] = int(tokens * share)
        raw["transfer"]["save_steps"] = 10_000
    return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="liger,at_qkvo")
    ap.add_argument("--tokens", type=int, default=92_160)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/recipes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, data = demo.prepare_demo()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.heldout_ppl.read_text().splitlines()][: args.windows]
    windows = [torch.tensor(tok(r["text"])["input_ids"][:512]) for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.variants.split(","):
        raw: dict[str, Any] = {"version": 1, "model": str(model_dir), "output": str(out / name),
                               "convert": [{"layers": "all", "mixer": "liger_attention"}]}  # fmt: skip
        if name == "base":
            from transformers import AutoModelForCausalLM

            row = {"variant": name, **heldout_ppl(AutoModelForCausalLM.from_pretrained(model_dir).eval(), windows)}
        else:
            if name != "untrained":
                raw["recover"] = recover_section(name, args.tokens, data.train)
            plan = load_plan(raw)
            model = convert(plan)
            t0 = time.perf_counter()
            if plan.recover is not None:
                model = recover(model, plan, tokenizer=tok, out_dir=out / name / "recover", resume=False)
            train_s = time.perf_counter() - t0
            row = {"variant": name, "tokens": args.tokens, "train_s": round(train_s, 1),
                   "report": getattr(model, "surgery_recover_report", None), **heldout_ppl(model.eval(), windows)}  # fmt: skip
        print(json.dumps(row, default=str), flush=True)
        (out / f"{name}.json").write_text(json.dumps(row, indent=1, default=str))


if __name__ == "__main__":
    main()
