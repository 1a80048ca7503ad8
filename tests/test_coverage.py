"""Coverage sweep in CI: every in-scope causal-LM class of the installed transformers, four checks each.

See benchmarks/coverage.py for the checks and docs/architectures.md for the table. A class outside
``KNOWN_GAPS`` must pass all four; a class inside must fail with a reason (so a fix is noticed and recorded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from benchmarks.coverage import CHECKS, run_checks
from benchmarks.coverage_configs import KNOWN_GAPS, OUT_OF_SCOPE, in_scope_types


@pytest.fixture(scope="module")
def shared_registry() -> Any:
    from surgery.registry import load_registry

    return load_registry(autoload=False)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("model_type", in_scope_types())
def test_model_type(model_type: str, shared_registry: Any, tmp_path: Path) -> None:
    out = run_checks(model_type, shared_registry, tmp_path)
    if model_type in KNOWN_GAPS:
        assert not out.ok, f"{model_type} now passes all checks: remove it from KNOWN_GAPS"
        assert out.error
    else:
        assert out.ok, out.error
    # Zero save/load failures among the classes that convert and decode.
    if out.passed.get("decode"):
        assert out.passed.get("save"), out.error
    assert set(out.passed) <= set(CHECKS)


def test_scope_lists_name_registered_types_only() -> None:
    registered = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert not set(OUT_OF_SCOPE) - registered
    assert not set(KNOWN_GAPS) - registered
    assert not set(KNOWN_GAPS) & set(OUT_OF_SCOPE)
