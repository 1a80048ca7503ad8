"""Benchmarks run as scripts (``python benchmarks/x.py``), which puts ``benchmarks/`` first on ``sys.path``: a
benchmark named like an installed package would be imported in its place by every library that imports it (a
``benchmarks/kernels.py`` once broke transformers 5.25, which imports the ``kernels`` package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_no_benchmark_shadows_an_installed_module() -> None:
    names = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")
    assert "train_step" in names  # the glob found the scripts
    shadowing = [n for n in names if importlib.util.find_spec(n) is not None]
    assert shadowing == [], f"benchmarks named like installed modules: {shadowing}"
