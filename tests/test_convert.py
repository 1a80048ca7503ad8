"""The converter: lossless identity surgery on every architecture, the manifest, and model-dependent errors."""

from __future__ import annotations

import pytest
import torch

import surgery
from surgery.mixer import Mixer
from surgery.plan import PlanError
from tests.models import ARCHS, tiny_model

IDENTITY = {"version": 2, "model": "unused/hub-id", "convert": [{"layers": "all", "mixer": "softmax"}]}


def _inputs(vocab: int = 160) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on the second row
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_conversion_is_exact(arch: str, registry) -> None:
    model = tiny_model(arch)
    ids, mask = _inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        ref_nomask = model(ids).logits
    plan = surgery.load_plan(IDENTITY, registry)
    out = surgery.convert(plan, model)
    assert out is model
    n = model.config.num_hidden_layers
    assert sum(isinstance(m, Mixer) for m in model.modules()) == n
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
        assert torch.equal(model(ids).logits, ref_nomask)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt_neox"])
def test_manifest_records_every_tensor(arch: str, registry) -> None:
    model = tiny_model(arch)
    model = surgery.convert(surgery.load_plan(IDENTITY, registry), model)
    rec = model.surgery.manifest
    assert [r.layer for r in rec] == list(range(model.config.num_hidden_layers))
    qkv = {"q_proj.weight", "k_proj.weight", "v_proj.weight"}
    for r in rec:
        assert "o_proj.weight" in r.copied
        # Fused qkv projections (Phi-3, GPT-NeoX) are split: reported as reshaped, not copied.
        assert qkv <= set(r.copied if arch == "llama" else r.reshaped)
        assert r.created == [] and r.dropped == []


def test_hybrid_keeps_unselected_layers(registry) -> None:
    model = tiny_model("llama")
    original = model.model.layers[1].self_attn
    plan = surgery.load_plan({**IDENTITY, "convert": [{"layers": [0, 2], "mixer": "softmax"}]}, registry)
    surgery.convert(plan, model)
    assert model.model.layers[1].self_attn is original
    assert isinstance(model.model.layers[0].self_attn, Mixer) and isinstance(model.model.layers[2].self_attn, Mixer)


def test_check_works_on_meta_device(tiny_dir: str, registry) -> None:
    plan = surgery.load_plan({**IDENTITY, "model": tiny_dir}, registry)
    matches = surgery.check(plan)
    assert [(m.layer, m.path, m.mixer, m.weights) for m in matches] == [
        (0, "model.layers.0.self_attn", "softmax", "copy_qkvo"),
        (1, "model.layers.1.self_attn", "softmax", "copy_qkvo"),
    ]


def test_converting_twice_is_refused(registry) -> None:
    model = surgery.convert(surgery.load_plan(IDENTITY, registry), tiny_model("llama"))
    with pytest.raises(ValueError, match="already converted"):
        surgery.convert(surgery.load_plan(IDENTITY, registry), model)


def test_weight_map_returning_unknown_key_is_named(registry) -> None:
    from surgery.hookspecs import hookimpl
    from surgery.mixer import WeightMap
    from surgery.registry import load_registry

    class Bad(WeightMap):
        name = "bad_map"

        def __call__(self, src, dst):
            return {**src, "gate.weight": torch.zeros(1)}

    class Plugin:
        @hookimpl
        def surgery_weight_maps(self):
            return [Bad]

    reg = load_registry(autoload=False, extra=[Plugin()])
    plan = surgery.load_plan({**IDENTITY, "convert": [{"mixer": "softmax", "weights": "bad_map"}]}, reg)
    with pytest.raises(PlanError, match=r"layer 0 \(model.layers.0.self_attn\): weight map 'bad_map'.*'gate.weight'"):
        surgery.convert(plan, tiny_model("llama"))
