"""Recovery throughput on several GPUs: tokens/s and peak memory per GPU under DDP and FSDP2 at 1, 2 (and 4) GPUs.

A Llama-3.2-1B-shaped model built from its config (random weights: 16 layers, hidden 2048, 32 query and 8 key/value
heads of 64, vocabulary 128256) is converted with ``liger_attention`` (every layer) and trained with the LoRA stage
(bf16 autocast, the plan's default adapters) on synthetic text, at sequence lengths 1024 and 4096. The baseline is
the unconverted model with plain LoRA: the same plan with the ``softmax`` mixer, which keeps softmax attention
(SDPA) on the original weights. Each GPU takes one sequence per step (global batch = number of GPUs), so perfect
scaling keeps tokens/s per GPU constant.

    python benchmarks/scaling.py [--gpus 1,2,4] [--seq 1024,4096] [--modes ddp,fsdp] [--steps 8 --warmup 3]
    python benchmarks/scaling.py --tiny --gpus 1,2          # a 2-layer model: a smoke test that runs on CPU

For every (mixer, mode, GPUs, sequence length) it launches ``torchrun --nproc-per-node N`` on this file itself (one
process per GPU; with one GPU the run is single-process, so DDP and FSDP are the same row); rank 0 writes the row.
GPU counts above the machine's are skipped. Prints a Markdown table and writes ``<out>/results.{json,md}``. Not part
of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)  # fmt: skip
TINY = dict(LLAMA_1B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
MIXERS = {"liger_attention": {"recurrent": "gla", "window": 64}, "softmax": {}}


def word_tokenizer(vocab: int) -> Any:
    """One token per word ``t<id>``: synthetic text of known length, no tokenizer download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", bos_token="<bos>")


def synthetic_data(path: Path, tokens: int, vocab: int) -> Path:
    """Documents of random words, ``tokens`` in all (Zipf-like ids so the loss can fall)."""
    rng = random.Random(0)
    with path.open("w") as f:
        left = tokens
        while left > 0:
            n = min(left, rng.randint(200, 2000))
            ids = [3 + min(int(rng.paretovariate(1.2)) - 1, vocab - 4) for _ in range(n)]
            f.write(json.dumps({"text": " ".join(f"t{i}" for i in ids)}) + "\n")
            left -= n + 1
    return path


def worker(job: dict[str, Any]) -> None:
    """One process of one measurement (under torchrun): convert, recover for a few steps, time the last ones."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    from surgery.convert import convert
    from surgery.plan import load_plan
    from surgery import recover
    from surgery.recovery.distributed import is_main, world_size

    shape = TINY if job["tiny"] else LLAMA_1B
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).to(torch.bfloat16)
    world = world_size()
    plan = load_plan({
        "version": 2, "model": "random-llama-3.2-1b-shape", "dtype": "bfloat16",
        "convert": [{"layers": "all", "mixer": job["mixer"], "options": MIXERS[job["mixer"]]}],
        "recover": {"data": {"source": job["data"], "seq_len": job["seq"]}, "distributed": job["mode"],
                    "stages": {"lora": {"max_steps": job["steps"], "batch_size": 1, "grad_accum": world,
                                        "save_steps": 10**6, "lr": 1e-4}}},
    })  # fmt: skip
    model = convert(plan, model)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.stop = 0.0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step == job["warmup"]:
                self.start = time.perf_counter()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
            self.stop = time.perf_counter()

    clock = Clock()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    recover(model, plan, tokenizer=word_tokenizer(shape["vocab_size"]), out_dir=job["out"], callbacks=[clock])
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    peaks = [peak]
    if world > 1:
        import torch.distributed as dist

        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
    if is_main():
        measured = job["steps"] - job["warmup"]
        tokens = measured * world * job["seq"]
        seconds = clock.stop - clock.start
        row = {k: job[k] for k in ("mixer", "mode", "gpus", "seq")}
        row |= {"tokens_per_s": tokens / seconds, "tokens_per_s_per_gpu": tokens / seconds / world,
                "peak_gib_per_gpu": max(peaks), "steps_timed": measured}  # fmt: skip
        Path(job["row"]).write_text(json.dumps(row))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(job: dict[str, Any], log: Path) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={job['gpus']}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", __file__, "--worker", json.dumps(job)]  # fmt: skip
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keep carried packages
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"), "PYTHONPATH": path,
           "SURGERY_DISABLE_PLUGIN_AUTOLOAD": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    with log.open("w") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not Path(job["row"]).exists():
        tail = log.read_text()[-1500:]
        print(f"[scaling] {job['mixer']} {job['mode']} x{job['gpus']} seq {job['seq']} failed (log {log}):\n{tail}")
        return None
    return json.loads(Path(job["row"]).read_text())


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | mode | GPUs | seq | tokens/s | tokens/s per GPU | peak GiB per GPU |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        name = "Liger (liger_attention)" if r["mixer"] == "liger_attention" else "base + LoRA (softmax)"
        lines.append(f"| {name} | {r['mode']} | {r['gpus']} | {r['seq']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {r['peak_gib_per_gpu']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--gpus", default="1,2,4")
    p.add_argument("--seq", default="1024,4096")
    p.add_argument("--modes", default="ddp,fsdp")
    p.add_argument("--mixers", default="liger_attention,softmax")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of the same layout (CPU smoke test)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else (2 if args.tiny else 0)
    if have == 0:
        print("[scaling] no GPU (use --tiny for a CPU smoke test)")
        return 1
    out = Path(args.out or tempfile.mkdtemp(prefix="surgery-scaling-"))
    out.mkdir(parents=True, exist_ok=True)
    gpus = [n for n in map(int, args.gpus.split(",")) if n <= have]
    seqs = list(map(int, args.seq.split(",")))
    modes = args.modes.split(",")
    if not torch.cuda.is_available():
        modes = [m for m in modes if m != "fsdp"]  # accelerate runs FSDP on accelerators only
    vocab = (TINY if args.tiny else LLAMA_1B)["vocab_size"]
    rows = []
    for seq in seqs:
        data = out / f"data-{seq}.jsonl"
        if not data.exists():
            synthetic_data(data, (args.steps + 2) * max(gpus) * seq * 2, vocab)
        for mixer in args.mixers.split(","):
            for n in gpus:
                for mode in modes if n > 1 else ["single"]:
                    name = f"{mixer}-{mode}-x{n}-{seq}"
                    job = dict(mixer=mixer, mode="ddp" if mode == "single" else mode, gpus=n, seq=seq,
                               steps=args.steps, warmup=args.warmup, tiny=args.tiny, data=str(data),
                               out=str(out / name), row=str(out / f"{name}.json"))  # fmt: skip
                    row = measure(job, out / f"{name}.log")
                    if row is not None:
                        row["mode"] = mode
                        rows.append(row)
                        print(f"[scaling] {name}: {row['tokens_per_s']:,.0f} tokens/s, "
                              f"{row['peak_gib_per_gpu']:.1f} GiB per GPU", flush=True)  # fmt: skip
    text = table(rows)
    print(text)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results.md").write_text(text + "\n")
    print(f"[scaling] results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
