"""Test setup: Triton runs in its interpreter when there is no GPU, plugin autoload is off, threads are few."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Must happen before any Triton kernel is defined (env.md F6): kernels read the flag when decorated.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SURGERY_DISABLE_PLUGIN_AUTOLOAD", "1")
# Tests build their models and data locally; a hub lookup would only wait for a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: the tests use tiny tensors, where a second thread costs more than it gives (and CI has 2 cores).
torch.set_num_threads(1)


def pytest_configure(config) -> None:  # noqa: ANN001
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: real-model or long tests")


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer tiny Llama saved in HF layout, for plans that name a model path."""
    from tests.models import tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", num_hidden_layers=2).save_pretrained(path)
    return str(path)


@pytest.fixture
def registry():
    """A fresh registry of the built-ins only (entry points are not loaded)."""
    from surgery.registry import load_registry

    return load_registry(autoload=False)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark``), restored after it (code under test may set its own): the
    tests' matrices are tiny, and a second thread only adds synchronisation (several times slower on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# tests/plugins/* are third-party packages with their own tests, run as their authors would (tests/test_plugin_kit.py).
collect_ignore_glob = ["plugins/*"]
