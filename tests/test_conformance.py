"""The conformance suite every registered mixer passes, generated from the registry (built-ins and a plugin's).

No mixer is named here: the cases are every mixer of the registry, each with every option set it declares in
``Mixer.test_options``, converted into tiny real models by the real converter with the mixer's default weight map.
The test plugin (``tests/plugins/surgery_example``: ``causal_mean``, and ``retention``, a recurrent mixer written as
one module on the public base) is registered like any third-party plugin, so a plugin author gets the same checks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

import surgery
from surgery.cache import MixerCacheLayer
from surgery.mixer import Mixer
from surgery.recurrent import RecurrentMixer
from surgery.registry import load_registry
from surgery.sites.attention import CANONICAL
from tests.models import tiny_model

sys.path.insert(0, str(Path(__file__).parent / "plugins" / "surgery_example"))
import surgery_example  # noqa: E402  (the test plugin, registered as an extra below)

ARCHS = ["llama", "qwen2", "gemma3"]


def _registry() -> Any:
    return load_registry(autoload=False, extra=[surgery_example])


def _cases() -> list[Any]:
    """(mixer, options, arch): every option set of every mixer; the first set on every architecture."""
    cases = []
    for name, cls in sorted(_registry().mixers.items()):
        for i, options in enumerate(cls.test_options):
            for arch in ARCHS if i == 0 else ARCHS[:1]:
                cases.append(pytest.param(name, options, arch, id=f"{name}-{i}-{arch}"))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def registry() -> Any:
    return _registry()


pytestmark = pytest.mark.usefixtures("one_thread")


def convert(registry: Any, mixer: str, options: dict, arch: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    rule = {"layers": "all", "mixer": mixer, "options": options}
    plan = surgery.load_plan({"version": 1, "model": "unused/hub-id", "convert": [rule]}, registry)
    return surgery.convert(plan, tiny_model(arch))


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


def test_every_registered_mixer_is_covered(registry: Any) -> None:
    covered = {c.values[0] for c in CASES}
    assert covered == set(registry.mixers) and {"retention", "causal_mean"} <= covered


@pytest.mark.parametrize("mixer,options,arch", CASES)
def test_prefill_then_decode_equals_one_forward(mixer: str, options: dict, arch: str, registry: Any) -> None:
    """A prefix, a 4-token chunk, then one token at a time through the cache == one forward; a converted layer's
    cache stays the same size while decoding."""
    model = convert(registry, mixer, options, arch)
    x = ids(2, 17)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(x).logits
        parts = [model(x[:, :6], cache=cache, use_cache=True).logits]
        parts.append(model(x[:, 6:10], cache=cache, use_cache=True).logits)
        sizes = []
        for t in range(10, 17):
            parts.append(model(x[:, t : t + 1], cache=cache, use_cache=True).logits)
            sizes.append(sum(_numel(layer) for layer in cache.layers if isinstance(layer, MixerCacheLayer)))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=2e-5)
    assert cache.get_seq_length() == 17
    assert len(set(sizes[1:])) == 1, f"a converted layer's cache grows with length: {sizes}"


def _numel(layer: MixerCacheLayer) -> int:
    tensors = list(layer.states or ()) + [t for t in (layer.keys, layer.values, layer.valid) if t is not None]
    tensors += list(getattr(layer, "aux", {}).values())
    return sum(t.numel() for t in tensors)


@pytest.mark.parametrize("mixer,options,arch", CASES)
def test_left_padding_and_batching_equal_single_rows(mixer: str, options: dict, arch: str, registry: Any) -> None:
    """Greedy generate() of a left-padded batch == each row alone (logits at every step); batched == single."""
    model = convert(registry, mixer, options, arch)
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
               return_dict_in_generate=True)  # fmt: skip
    a, b = ids(1, 9, seed=1), ids(1, 4, seed=2)
    batch = torch.cat([a, torch.cat([ids(1, 5, seed=9), b], 1)])  # real embeddings on padding: must be masked
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    with torch.no_grad():
        out_a, out_b = model.generate(a, **gen), model.generate(b, **gen)
        out = model.generate(batch, attention_mask=mask, **gen)
    assert torch.equal(out.sequences[0], out_a.sequences[0])
    assert torch.equal(out.sequences[1, 5:], out_b.sequences[0])
    for step, (both, row_a, row_b) in enumerate(zip(out.logits, out_a.logits, out_b.logits)):
        torch.testing.assert_close(both[0], row_a[0], rtol=1e-4, atol=2e-5, msg=f"row 0, step {step}")
        torch.testing.assert_close(both[1], row_b[0], rtol=1e-4, atol=2e-5, msg=f"row 1, step {step}")


@pytest.mark.parametrize("mixer,options,arch", CASES)
def test_save_load_round_trip(mixer: str, options: dict, arch: str, registry: Any, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    model = convert(registry, mixer, options, arch, seed=1)
    with torch.no_grad():  # perturb so that a load that silently re-initialised a parameter would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    surgery.save(model, tmp_path / "m")
    loaded = surgery.load(tmp_path / "m", registry=registry)  # load() re-applies the plan: with the plugin's mixers
    x = ids(2, 11, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert [r.mixer for r in loaded.surgery.manifest] == [r.mixer for r in model.surgery.manifest]


@pytest.mark.parametrize("mixer,options,arch", CASES)
def test_finite_gradients_to_every_trainable_parameter(mixer: str, options: dict, arch: str, registry: Any) -> None:
    """A training step reaches every parameter a mixer owns (a mixer may ignore the pretrained q/k) with finite,
    non-zero gradients; the values and the output projection always learn."""
    model = convert(registry, mixer, options, arch).train()
    x = ids(2, 24)
    model(x, labels=x).loss.backward()
    mixers = [m for m in model.modules() if isinstance(m, Mixer) and not isinstance(m, RecurrentMixer) or
              (isinstance(m, RecurrentMixer) and hasattr(m, "o_proj"))]  # fmt: skip
    assert len(mixers) == model.config.num_hidden_layers
    for m in mixers:
        for name, p in m.named_parameters():
            g = p.grad
            if name.split(".")[0] in ("q_proj", "k_proj", "q_norm", "k_norm") and g is None:
                continue
            assert g is not None, f"layer {m.layer_idx} {name}: no gradient"
            assert torch.isfinite(g).all(), f"layer {m.layer_idx} {name}: non-finite gradient"
        for name in ("v_proj.weight", "o_proj.weight"):
            assert m.get_parameter(name).grad.abs().sum() > 0, f"layer {m.layer_idx} {name}"


@pytest.mark.parametrize("mixer,options,arch", CASES)
def test_manifest_accounts_for_every_tensor(mixer: str, options: dict, arch: str, registry: Any) -> None:
    """Per layer: copied + reshaped + created = the mixer's tensors (each once); used + dropped = the pretrained."""
    model = convert(registry, mixer, options, arch)
    for rec in model.surgery.manifest:
        own = list(model.get_submodule(rec.path).state_dict())
        listed = rec.copied + rec.reshaped + rec.created
        assert sorted(listed) == sorted(own), f"layer {rec.layer}"
        used = [n for n in rec.copied + rec.reshaped if n in CANONICAL]
        assert set(used) | set(rec.dropped) >= {n for n in rec.dropped} and not set(used) & set(rec.dropped)
        assert all(n in CANONICAL for n in rec.dropped)
        assert rec.options == model.get_submodule(rec.path).options.model_dump(mode="json")


def test_a_plugin_recurrent_mixer_is_liger_attentions_branch(registry: Any) -> None:
    """``retention`` (one module of the test plugin) runs inside liger_attention; decoding stays exact."""
    model = convert(registry, "liger_attention", {"window": 3, "recurrent": {"mixer": "retention",
                                                                            "options": {"gamma": 0.7}}}, "llama")  # fmt: skip
    layer = model.model.layers[0].self_attn
    assert type(layer.recurrent).__name__ == "Retention" and layer.recurrent.options.gamma == 0.7
    assert not hasattr(layer.recurrent, "q_proj")  # the branch shares the parent's projections
    x = ids(1, 12, seed=4)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(x).logits
        parts = [model(x[:, :5], cache=cache, use_cache=True).logits]
        parts += [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=2e-5)
