"""The static decode cache (``surgery/static_cache.py``) on CPU: every registered mixer decodes over it exactly as
over transformers' DynamicCache (left padding included), buffers keep their addresses, rows are independent slots.

The captured (CUDA graph) step runs the same code over the same buffers; its GPU tests are in ``test_generate.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import surgery
from surgery.generate import Decoder, cache_kwarg, generate
from surgery.registry import load_registry
from surgery.static_cache import StaticCacheError, StaticDecodeCache, StaticKVLayer, StaticMixerLayer, layer_kinds
from tests.models import tiny_model

sys.path.insert(0, str(Path(__file__).parent / "plugins" / "surgery_example"))
import surgery_example  # noqa: E402

REGISTRY = load_registry(autoload=False, extra=[surgery_example])
GEN = dict(do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def convert(mixer: str, options: dict | None = None, layers: Any = "all", arch: str = "llama") -> Any:
    torch.manual_seed(0)
    rule = {"layers": layers, "mixer": mixer, "options": options or {}}
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]}, REGISTRY)
    return surgery.convert(plan, tiny_model(arch))


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.cat([ids(1, 9, seed=1), ids(1, 9, seed=2)])
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    return x, mask


def hf_reference(model: Any, x: torch.Tensor, mask: torch.Tensor, n: int) -> Any:
    with torch.no_grad():
        return model.generate(x, attention_mask=mask, max_new_tokens=n, **GEN)  # EOS ends rows, as in Decoder


def _cases() -> list[Any]:
    return [pytest.param(name, cls.test_options[0], id=name) for name, cls in sorted(REGISTRY.mixers.items())]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mixer,options", _cases())
def test_every_mixer_decodes_over_the_static_cache_like_eager(mixer: str, options: dict) -> None:
    """Left-padded greedy decoding through ``Decoder`` (static cache, eager step) == HF generate (DynamicCache)."""
    model = convert(mixer, options)
    x, mask = padded_batch()
    ref = hf_reference(model, x, mask, 6)
    out = generate(model, x, mask, max_new_tokens=6, capture="eager", output_logits=True)
    assert out.mode == "eager"
    assert torch.equal(out.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=f"step {step}")


@pytest.mark.parametrize("mixer,options,layers", [
    ("gla", {}, "all"), ("liger_attention", {"window": 4}, "all"), ("liger_attention", {"window": 4}, [0, 2]),
])  # fmt: skip
def test_hf_generate_takes_the_static_cache_object(mixer: str, options: dict, layers: Any) -> None:
    """``model.generate(cache=StaticDecodeCache(...))`` (HF's own loop) equals the default DynamicCache."""
    model = convert(mixer, options, layers)
    x, mask = padded_batch()
    ref = hf_reference(model, x, mask, 5)
    cache = StaticDecodeCache(model, 2, max_length=9 + 5)
    key = cache_kwarg(model)  # "cache" (transformers 5.2x) or "past_key_values"
    with torch.no_grad():
        out = model.generate(x, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, **{key: cache}, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_layer_kinds_and_buffers_keep_their_addresses() -> None:
    """Converted layers get StaticMixerLayer, kept ones StaticKVLayer; decoding never reallocates a buffer."""
    model = convert("liger_attention", {"window": 4}, [0, 2])
    assert layer_kinds(model) == ["mixer", "kv", "mixer"]
    dec = Decoder(model, 2, max_length=20, capture="eager")
    assert [type(la) for la in dec.cache.layers] == [StaticMixerLayer, StaticKVLayer, StaticMixerLayer]
    x, mask = padded_batch()
    dec.prefill(x, mask)
    assert dec.cache.allocated
    ptrs = [t.data_ptr() for t in dec.cache.tensors()]
    size = dec.cache.nbytes()
    for _ in range(4):
        dec.step()
    assert [t.data_ptr() for t in dec.cache.tensors()] == ptrs and dec.cache.nbytes() == size
    layer = dec.cache.layers[0]
    assert layer.states[0].shape[0] == 2 and layer.keys.shape[2] == 4 and layer.seen == 9 + 4
    assert dec.cache.get_seq_length() == 13


def test_kept_layers_need_and_respect_max_length() -> None:
    model = convert("gla", {}, [0, 2])
    with pytest.raises(StaticCacheError, match="max_length"):
        StaticDecodeCache(model, 2)
    dec = Decoder(model, 1, max_length=11, capture="eager")
    dec.prefill(ids(1, 9))
    dec.step()
    dec.step()  # the prompt's 9 columns, the prefill's token and this one: 11
    with pytest.raises(ValueError, match="max_length=11 reached"):
        dec.step()


def test_kept_sliding_layers_are_refused_with_their_indices() -> None:
    model = convert("gla", {}, [1], arch="gemma3")  # layers 0 and 2 of the tiny Gemma3 are sliding
    with pytest.raises(StaticCacheError, match=r"layers \[0, 2\] keep sliding-window"):
        StaticDecodeCache(model, 1, max_length=32)


def test_a_state_that_changes_shape_is_refused() -> None:
    layer = StaticMixerLayer(2, layer_idx=5)
    layer.bind(5, 0)
    layer.commit(3, states=(torch.zeros(2, 4, 8, 8),))
    with pytest.raises(StaticCacheError, match="layer 5: a state of shape"):
        layer.commit(1, states=(torch.zeros(2, 4, 8, 4),))
    with pytest.raises(StaticCacheError, match="batch 3 != static cache batch 2"):
        StaticMixerLayer(2, 0).commit(1, states=(torch.zeros(3, 1),))


@pytest.mark.parametrize("mixer,options,layers", [
    ("gla", {}, "all"), ("liger_attention", {"window": 3}, "all"), ("liger_attention", {"window": 3}, [0, 2]),
    ("gsa", {"num_slots": 4}, "all"), ("liger_attention", {"window": 3, "sinks": 2}, "all"),
    ("liger_attention", {"window": 2, "memory": 3, "memory_chunk": 2, "sinks": 2}, "all"),
])  # fmt: skip
def test_a_slot_is_reset_and_refilled_without_touching_the_others(mixer: str, options: dict, layers: Any) -> None:
    """Rows of different lengths; row 1 is dropped mid-decode and a new prompt is prefilled into it: row 0 goes on
    as if alone, row 1 decodes its new prompt as if alone (tokens equal, logits close)."""
    model = convert(mixer, options, layers)
    a, b, c = ids(1, 9, seed=1), ids(1, 5, seed=2), ids(1, 7, seed=3)
    x = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    dec = Decoder(model, 2, max_length=30, capture="eager")
    rows: list[list[torch.Tensor]] = [[], []]
    logits: list[list[torch.Tensor]] = [[], []]

    def record(tok: torch.Tensor) -> None:
        for r in (0, 1):
            rows[r].append(tok[r].clone())
            logits[r].append(dec.logits[r].clone())

    record(dec.prefill(x, mask))
    for _ in range(3):
        record(dec.step())
    dec.reset_slot(1)
    rows[1], logits[1] = [], []
    first = dec.fill_slot(1, c[0])
    rows[1].append(first.clone())
    logits[1].append(dec.logits[1].clone())
    for _ in range(4):
        tok = dec.step()
        rows[0].append(tok[0].clone())
        logits[0].append(dec.logits[0].clone())
        rows[1].append(tok[1].clone())
        logits[1].append(dec.logits[1].clone())
    for r, prompt, n in ((0, a, 8), (1, c, 5)):
        ref = generate(model, prompt, max_new_tokens=n, capture="eager", output_logits=True)
        assert torch.equal(torch.stack(rows[r]), ref.new_tokens[0]), f"row {r}"
        for step, (got, want) in enumerate(zip(logits[r], ref.logits)):
            torch.testing.assert_close(got, want[0], rtol=1e-4, atol=2e-5, msg=f"row {r} step {step}")


def test_eos_stops_a_row_and_pads_it_like_hf() -> None:
    model = convert("gla")
    x, mask = padded_batch()
    free = generate(model, x, mask, max_new_tokens=6, capture="eager")
    eos = int(free.new_tokens[0, 2])  # row 0 emits it at step 2
    out = generate(model, x, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0, capture="eager")
    with torch.no_grad():
        ref = model.generate(x, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, do_sample=False,
                             pad_token_id=0)  # fmt: skip
    assert torch.equal(out.sequences, ref[:, : out.sequences.shape[1]])
    assert (out.new_tokens[0, 3:] == 0).all()


@pytest.mark.parametrize("options", [{"window": 3, "sinks": 2}, {"window": 2, "memory": 3, "memory_chunk": 2,
                                                                  "sinks": 2}])  # fmt: skip
def test_a_reused_decoder_forgets_the_last_batch(options: dict) -> None:
    """A second prefill through the same static cache starts from nothing: sinks and memory (``aux``) are zeroed
    with the states and the window, so the second batch decodes as through a fresh decoder."""
    model = convert("liger_attention", options)
    x, mask = padded_batch()
    other = ids(2, 11, seed=7)
    dec = Decoder(model, 2, capture="eager")
    generate(model, other, max_new_tokens=8, decoder=dec)
    again = generate(model, x, mask, max_new_tokens=6, decoder=dec, output_logits=True)
    fresh = generate(model, x, mask, max_new_tokens=6, capture="eager", output_logits=True)
    assert torch.equal(again.sequences, fresh.sequences)
    for a, b in zip(again.logits, fresh.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
