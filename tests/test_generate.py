"""``surgery.generate``: the decode loop, its capture modes, the HF ``custom_generate`` hook, the CLI and the
benchmark at tiny size. Tests marked ``gpu`` check that the captured step (CUDA graph, torch.compile) decodes
exactly what the eager step decodes; without CUDA they are skipped and the CPU tests cover the same cache.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import surgery
from surgery.cli import main
from surgery.generate import Decoder, custom_generate, generate
from surgery.registry import load_registry
from tests.models import tiny_model

REGISTRY = load_registry(autoload=False)
ROOT = Path(__file__).resolve().parents[1]


def convert(mixer: str, options: dict | None = None, layers: Any = "all", dtype: torch.dtype = torch.float32,
            device: str = "cpu") -> Any:  # fmt: skip
    torch.manual_seed(0)
    rule = {"layers": layers, "mixer": mixer, "options": options or {}}
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]}, REGISTRY)
    return surgery.convert(plan, tiny_model("llama")).to(device=device, dtype=dtype).eval()


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([ids(1, 9, seed=1), ids(1, 9, seed=2), ids(1, 9, seed=3)])
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return x, mask


def test_custom_generate_through_model_generate() -> None:
    """``model.generate(custom_generate=...)``: HF prepares the inputs, our loop decodes; same as HF greedy."""
    model = convert("liger_attention", {"window": 4})
    x, mask = padded_batch()
    with torch.no_grad():
        ref = model.generate(x, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0)  # fmt: skip
        out = model.generate(x, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0, custom_generate=custom_generate, capture="eager")  # fmt: skip
    assert torch.equal(out, ref)


@pytest.mark.parametrize("options", [
    {"window": 4}, {"window": 2, "memory": 3, "memory_chunk": 2, "sinks": 2},
    {"window": 2, "memory": 3, "memory_chunk": 2, "sinks": 1, "combine": "shared", "shared_bias": 1.0},
], ids=["window", "memory", "memory-shared"])  # fmt: skip
def test_compiled_step_traces_and_decodes_like_eager(options: dict) -> None:
    """The torch.compile path, traced by dynamo with the eager backend (no compiler on CPU CI): one graph, same
    tokens and logits as the eager step over the same static cache. No graph break also means no host
    synchronisation and no data-dependent shape: what a CUDA graph capture needs (the retrieval memory's decode
    step consolidates on the device)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = convert("liger_attention", options, [0, 2])
    x, mask = padded_batch()
    ref = generate(model, x, mask, max_new_tokens=5, capture="eager", output_logits=True)
    dec = Decoder(model, 3, max_length=20, capture="compile", compile_backend="eager")
    out = generate(model, x, mask, max_new_tokens=5, decoder=dec, output_logits=True)
    assert out.mode == "compile" and torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_a_mixer_that_cannot_be_captured_decodes_eagerly_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from surgery.plugins.gla import GLA

    monkeypatch.setattr(GLA, "capturable", False)
    model = convert("gla")
    with pytest.warns(UserWarning, match=r"\['GLA'\] declare capturable = False"):
        dec = Decoder(model, 1, capture="compile", compile_backend="eager")
    assert dec.mode == "eager"
    out = generate(model, ids(1, 5), max_new_tokens=3, decoder=dec)
    assert out.new_tokens.shape == (1, 3)


def test_bad_capture_mode_is_named() -> None:
    with pytest.raises(ValueError, match="capture must be one of"):
        Decoder(convert("gla"), 1, capture="cudagraph")


def _word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 160)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_cli_generate_streams_and_prints_tokens_per_second(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = convert("liger_attention", {"window": 4})
    surgery.save(model, tmp_path / "run" / "model", tokenizer=_word_tokenizer())
    code = main(["generate", str(tmp_path / "run"), "--prompt", "w5 w6 w7 w8", "--prompt", "w9",
                 "--max-new-tokens", "4", "--capture", "eager"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "w" in out.splitlines()[0]  # the streamed words
    assert "new tokens, batch 2:" in out and "tok/s decoding (eager)" in out


def _every_option_set() -> list[Any]:
    return [pytest.param(name, options, id=f"{name}-{i}") for name, cls in sorted(REGISTRY.mixers.items())
            for i, options in enumerate(cls.test_options)]  # fmt: skip


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mixer,options", _every_option_set())
def test_cli_generate_decodes_a_saved_model_of_every_mixer_and_option(mixer: str, options: dict, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """``surgery generate`` on a saved model of each mixer with each of its option sets (every option that shapes
    the cache: windows, sinks, the retrieval memory, shared normalizers, branches): a two-token prompt and a
    left-padded one-token one, so the static cache is allocated from a prefill shorter than every window (the main
    job's model failed so) and fills while decoding (the memory consolidates several times). The streamed text is HF's greedy decode of
    the loaded model over a DynamicCache."""
    model = convert(mixer, options)
    tok = _word_tokenizer()
    surgery.save(model, tmp_path / "run" / "model", tokenizer=tok)
    prompts = ["w5 w6", "w9"]
    code = main(["generate", str(tmp_path / "run"), "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "12", "--capture", "eager", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    loaded = surgery.load(tmp_path / "run" / "model").eval()
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = loaded.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=2)
    want = tok.decode(ref[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.out.split("\n")[0] == want


def test_cli_generate_names_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "no saved model (config.json)" in capsys.readouterr().err


def test_benchmark_runs_at_tiny_size(tmp_path: Path) -> None:
    """``benchmarks/generate.py --tiny``: converted (eager, captured) and base side by side, one JSON line each."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.generate import main as bench_main

    out = tmp_path / "gen.jsonl"
    bench_main(["--tiny", "--batch", "2", "--context", "16", "--new-tokens", "4", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    names = {(r["model"], r["mode"]) for r in rows}
    assert {("base", "eager"), ("gla", "eager"), ("liger_attention", "eager"), ("memory", "eager")} <= names
    assert all(r["tok_per_s"] > 0 for r in rows if "error" not in r)
    assert not [r for r in rows if "error" in r and r["model"] == "memory"]  # the main job's recipe decodes


def test_benchmark_takes_a_rule_and_a_plan(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.generate import main as bench_main

    rows = bench_main(["--tiny", "--batch", "2", "--context", "16", "--new-tokens", "3", "--base-modes", "none", "--modes", "eager",
                       "--mixers", "mem={mixer: liger_attention, options: {window: 2, sinks: 1, memory: 4, "
                       "memory_chunk: 2, w_swa: 1.0, w_rec: 0.0}}", "examples/swa-only.yaml"])  # fmt: skip
    assert [(r["model"], "error" in r) for r in rows] == [("mem", False), ("swa-only", False)]


# -- GPU: the captured step decodes exactly what the eager step decodes ------------------------------------------

CUDA_CASES = [("gla", {}, "all"), ("liger_attention", {"window": 8}, "all"), ("liger_attention", {"window": 8}, [0, 2]),
              ("hgrn2", {}, "all"), ("gsa", {"num_slots": 4}, "all"), ("swa", {"window": 8}, "all"),
              # the main job's recipe at tiny size: the memory consolidates inside the captured step
              ("liger_attention", {"window": 2, "sinks": 2, "memory": 4, "memory_chunk": 2, "w_rec": 0}, "all"),
              ("liger_attention", {"window": 3, "sinks": 1, "memory": 3, "memory_chunk": 2, "combine": "shared",
                                   "shared_bias": 0.0}, [0, 2])]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("capture", ["graph", "compile"])
@pytest.mark.parametrize("mixer,options,layers", CUDA_CASES)
def test_captured_greedy_equals_eager(mixer: str, options: dict, layers: Any, capture: str) -> None:
    model = convert(mixer, options, layers, dtype=torch.bfloat16, device="cuda")
    x, mask = padded_batch()
    x, mask = x.cuda(), mask.cuda()
    ref = generate(model, x, mask, max_new_tokens=12, capture="eager", output_logits=True)
    out = generate(model, x, mask, max_new_tokens=12, capture=capture, output_logits=True)
    assert out.mode == capture
    if capture == "graph":  # a CUDA graph replays the eager kernels: bit-identical
        assert torch.equal(out.sequences, ref.sequences)
        for a, b in zip(out.logits, ref.logits):
            assert torch.equal(a, b)
        return
    # Inductor fuses differently (bf16 rounding): logits agree to rounding, and the greedy tokens agree until a step
    # where eager's best two logits were within that rounding (a near-tie on a random tiny model), if any.
    new = x.shape[1]
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        same = torch.equal(out.sequences[:, new + step], ref.sequences[:, new + step])
        if not same:
            top2 = b.float().topk(2, dim=-1).values
            rows = out.sequences[:, new + step] != ref.sequences[:, new + step]
            assert bool(((top2[:, 0] - top2[:, 1])[rows] < 1e-1).all()), f"step {step}: greedy tokens differ"
            break
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=1e-1)


@pytest.mark.gpu
def test_captured_greedy_equals_hf_dynamic_cache_fp32() -> None:
    model = convert("liger_attention", {"window": 8}, [0, 2], device="cuda")
    model.generation_config.eos_token_id = None  # no EOS on either side (min_new_tokens would mask it in HF only)
    x, mask = padded_batch()
    x, mask = x.cuda(), mask.cuda()
    with torch.no_grad():
        ref = model.generate(x, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    out = generate(model, x, mask, max_new_tokens=10, capture="graph")
    assert out.mode == "graph" and torch.equal(out.sequences, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"window": 8}, {"window": 4, "recurrent": "hgrn2"}])
def test_fused_liger_decode_step_equals_the_two_branch_step(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused window kernel (RoPE, window attention, window update and mix in one launch) decodes what the
    two-branch path decodes over the same static cache, left padding included (fp32)."""
    import surgery.plugins.liger as liger_plugin

    model = convert("liger_attention", options, device="cuda")
    x, mask = padded_batch()
    x, mask = x.cuda(), mask.cuda()
    fused = generate(model, x, mask, max_new_tokens=12, capture="eager", output_logits=True)
    monkeypatch.setattr(liger_plugin, "FUSED_DECODE", False)
    plain = generate(model, x, mask, max_new_tokens=12, capture="eager", output_logits=True)
    assert torch.equal(fused.sequences, plain.sequences)
    for a, b in zip(fused.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"window": 8}, {"window": 2, "sinks": 2, "memory": 4, "memory_chunk": 2}],
                         ids=["window", "memory"])  # fmt: skip
def test_slot_refill_under_a_captured_graph(options: dict) -> None:
    """The graph stays valid when a slot is reset and refilled (same buffers): row 1 decodes its new prompt as if
    alone, row 0 is untouched."""
    model = convert("liger_attention", options, [0, 2], device="cuda")
    a, c = ids(1, 9, seed=1).cuda(), ids(1, 7, seed=3).cuda()
    dec = Decoder(model, 2, max_length=40, capture="graph")
    first = dec.prefill(torch.cat([a, a]))
    row0, row1 = [int(first[0])], []
    for _ in range(3):
        row0.append(int(dec.step()[0]))
    dec.reset_slot(1)
    row1.append(int(dec.fill_slot(1, c[0])))
    for _ in range(5):
        tok = dec.step()
        row0.append(int(tok[0]))
        row1.append(int(tok[1]))
    assert dec.mode == "graph"
    ref_a = generate(model, a, max_new_tokens=9, capture="eager").new_tokens[0].tolist()
    ref_c = generate(model, c, max_new_tokens=6, capture="eager").new_tokens[0].tolist()
    assert row0 == ref_a and row1 == ref_c
