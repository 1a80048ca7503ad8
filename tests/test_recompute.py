"""Recomputing the token mixing in the backward (``Mixer.recompute``): the same gradients, fewer saved tensors."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from torch import nn

import surgery
from surgery.mixer import Mixer
from tests.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    ("gla", {}),
    ("hgrn2", {}),
    ("gsa", {}),
    ("mom", {}),
    ("liger_attention", {"window": 3}),
    ("liger_attention", {"window": 3, "sinks": 2, "window_dropout": 0.5}),
]


def converted(mixer: str, options: dict[str, Any], registry: Any) -> nn.Module:
    plan = {"version": 2, "model": "unused", "convert": [{"layers": "all", "mixer": mixer, "options": options}]}
    model = surgery.convert(surgery.load_plan(plan, registry), tiny_model("llama"))
    return model.train()


def set_recompute(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, Mixer):
            m.recompute = on


def grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of a loss on the last hidden states w.r.t. the input embeddings and every parameter."""
    x = x.detach().requires_grad_()
    torch.manual_seed(7)  # window dropout draws: the same in both runs
    h = model.model(inputs_embeds=x, use_cache=False).last_hidden_state
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(h.square().mean(), [x, *params], allow_unused=True))


@pytest.mark.parametrize(("mixer", "options"), CASES, ids=lambda c: str(c))
def test_recomputed_gradients_equal_stored_ones(mixer: str, options: dict[str, Any], registry: Any) -> None:
    model = converted(mixer, options, registry)
    x = torch.randn(2, 19, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    set_recompute(model, False)
    stored = grads(model, x)
    set_recompute(model, True)
    recomputed = grads(model, x)
    assert sum(g is not None for g in stored) > 1
    for a, b in zip(stored, recomputed, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors the forward saves for the backward (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(inputs_embeds=x.detach().requires_grad_(), use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("mixer", ["gla", "liger_attention"])
def test_recompute_keeps_less_for_the_backward(mixer: str, registry: Any) -> None:
    """Feature maps, gates and the branches' inputs are no longer kept: the whole model saves far less."""
    model = converted(mixer, {}, registry)
    model.requires_grad_(False)  # as in LoRA-like training: activations only
    x = torch.randn(1, 64, model.config.hidden_size)
    set_recompute(model, False)
    stored = saved_bytes(model, x)
    set_recompute(model, True)
    assert saved_bytes(model, x) < 0.6 * stored


def test_inference_and_cached_forwards_do_not_recompute(registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model = converted("liger_attention", {"window": 3}, registry)
    set_recompute(model, True)
    calls: list[int] = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr("surgery.mixer.checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        model(ids)
    model.eval()
    model(ids)
    assert calls == []
    model.train()
    model(ids)  # with a cache (the config's use_cache): the cache is continued, not recomputed
    assert calls == []
    model(ids, use_cache=False)  # as recovery trains
    assert len(calls) == model.config.num_hidden_layers


@pytest.mark.gpu
@pytest.mark.parametrize("mixer", ["gla", "liger_attention"])
def test_on_cuda_recompute_is_the_default_and_exact(mixer: str, registry: Any) -> None:
    """On CUDA (Triton kernels; Liger's fused op) the default recomputes: the same gradients, far fewer saved bytes
    and no higher peak. (In this 2-layer model the peak can fall inside a backward kernel's own buffers, the same
    either way, so the peak is only bounded; the Llama-3-8B-shape saving is measured by benchmarks/train_step.py.)"""
    model = converted(mixer, {}, registry).cuda()
    model.requires_grad_(False)
    x = torch.randn(1, 1000, model.config.hidden_size, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    peaks = {}
    found = {}
    for on in (False, None):  # warm-up: Triton compiles and autotunes (with buffers of its own) outside the window
        set_recompute(model, on)  # type: ignore[arg-type]
        grads(model, x)
    for on in (False, None):
        set_recompute(model, on)  # type: ignore[arg-type]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        found[on] = grads(model, x)
        torch.cuda.synchronize()
        peaks[on] = torch.cuda.max_memory_allocated() - before
    torch.testing.assert_close(found[None][0], found[False][0], rtol=1e-5, atol=1e-6)
    assert peaks[None] <= peaks[False], peaks
    saved = {}
    for on in (False, None):
        set_recompute(model, on)  # type: ignore[arg-type]
        saved[on] = saved_bytes(model, x)
    assert saved[None] < 0.6 * saved[False], saved


def test_chunk_kernel_keeps_its_states_when_saves_are_transient() -> None:
    """Inside ``transient_saves()`` the GLA chunk kernel keeps its per-chunk states (no recompute in its backward),
    with the same gradients."""
    from surgery.kernels import transient_saves
    from surgery.kernels.gla.chunk import chunk_gla_triton

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 70, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    gk = (-torch.rand(1, 70, 2, 16, generator=g) * 0.2).requires_grad_()
    found, sizes = [], []
    for transient in (False, True):
        seen: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.numel()) or t, lambda t: t):
            with transient_saves() if transient else contextlib.nullcontext():
                o, _ = chunk_gla_triton(q, k, v, gk)
        found.append(torch.autograd.grad(o.square().sum(), (q, k, v, gk)))
        sizes.append(sum(seen))
    assert sizes[1] > sizes[0]
    for a, b in zip(*found, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
