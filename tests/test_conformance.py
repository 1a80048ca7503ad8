"""The conformance suite every registered mixer passes, generated from the registry (built-ins and a plugin's).

The suite itself is ``surgery.testing.conformance_suite``, the one a plugin author runs under their own pytest
(``tests/test_plugin_kit.py`` runs the example plugin's tests that way). Here it covers every mixer of the registry,
each with every option set it declares in ``Mixer.test_options``, converted into tiny real models by the real
converter with the mixer's default weight map. The test plugin (``tests/plugins/surgery_example``: ``causal_mean``,
and ``retention``, a recurrent mixer written as one module on the public base) is registered like any third-party
plugin.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from surgery.registry import load_registry
from surgery.testing import conformance_cases, conformance_suite, converted

sys.path.insert(0, str(Path(__file__).parent / "plugins" / "surgery_example"))
import surgery_example  # noqa: E402  (the test plugin, registered as an extra below)

REGISTRY = load_registry(autoload=False, extra=[surgery_example])
CASES = conformance_cases(REGISTRY, REGISTRY.mixers)

pytestmark = pytest.mark.usefixtures("one_thread")

#: Every registered mixer, built-ins and the plugin's, through the kit a plugin author uses.
TestConformance = conformance_suite(list(REGISTRY.mixers), registry=REGISTRY)


@pytest.fixture(scope="module")
def registry() -> Any:
    return REGISTRY


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


def test_every_registered_mixer_is_covered(registry: Any) -> None:
    covered = {c.values[0] for c in CASES}
    assert covered == set(registry.mixers) and {"retention", "causal_mean"} <= covered


def test_a_plugin_recurrent_mixer_is_liger_attentions_branch(registry: Any) -> None:
    """``retention`` (one module of the test plugin) runs inside liger_attention; decoding stays exact."""
    model = converted(registry, "liger_attention", {"window": 3, "recurrent": {"mixer": "retention",
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
