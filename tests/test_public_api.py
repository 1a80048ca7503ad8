"""The public API is pinned: changing it is a deliberate act."""

from __future__ import annotations

import surgery


def test_public_api() -> None:
    assert sorted(surgery.__all__) == sorted(
        ["PlanError", "check", "convert", "evaluate", "load", "load_plan", "recover", "run", "save"]
    )
    for name in surgery.__all__:
        assert callable(getattr(surgery, name)) or isinstance(getattr(surgery, name), type)
