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


def mixing_saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the activations the converted layers' mixers save for the backward (each storage counted once,
    weights left out): the hooks are active only inside each layer's mixer, so the rest of the model (norms, MLPs), the same either way,
    does not dilute the comparison."""
    from surgery.static_cache import _top_mixers

    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # kept anyway: not activations

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    active: list[Any] = []
    handles = []
    for mixer in _top_mixers(model).values():
        def enter(*_: Any) -> None:
            active.append(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            active[-1].__enter__()

        def leave(*_: Any) -> None:
            active.pop().__exit__(None, None, None)

        handles += [mixer.register_forward_pre_hook(enter), mixer.register_forward_hook(leave)]
    try:
        model.model(inputs_embeds=x.detach().requires_grad_(), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values())


def test_mixing_saves_only_its_inputs_when_recomputed(registry: Any) -> None:
    """What the GPU test below bounds, on the CPU: recomputing, a mixer keeps its input x, q, k, v (the checkpoint's
    inputs; the projections keep x and the output projection its input), nothing else."""
    model = converted("gla", {}, registry)
    model.requires_grad_(False)
    x = torch.randn(1, 64, model.config.hidden_size)
    set_recompute(model, True)
    cfg = model.config
    D = cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.hidden_size + 2 * cfg.num_attention_heads * D + 2 * cfg.num_key_value_heads * D  # x, q, o; k, v
    assert mixing_saved_bytes(model, x) <= 64 * per_token * 4 * cfg.num_hidden_layers
    set_recompute(model, False)
    assert mixing_saved_bytes(model, x) > 64 * per_token * 4 * cfg.num_hidden_layers


@pytest.mark.gpu
@pytest.mark.parametrize("mixer", ["gla", "liger_attention"])
def test_on_cuda_recompute_is_the_default_and_exact(mixer: str, registry: Any) -> None:
    """On CUDA (Triton kernels; Liger's fused op) the default recomputes, with the same gradients (fp32, tiny
    model); in a bf16 model of 8 layers, head dim 64 and GQA at 2,048 tokens, where the activations dominate the
    peak, each mixer keeps only its inputs (x, q, k, v, and the output projection's input), less than it keeps
    storing its feature maps and kernel inputs, and the peak is no higher (the Llama-3-8B-shape figures are
    benchmarks/train_step.py's)."""
    model = converted(mixer, {}, registry).cuda()
    model.requires_grad_(False)
    x = torch.randn(1, 1000, model.config.hidden_size, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    assert all(m.recompute is None for m in model.modules() if isinstance(m, Mixer))  # the default: on for CUDA
    found = {}
    for on in (False, None):
        set_recompute(model, on)  # type: ignore[arg-type]
        found[on] = grads(model, x)
    for a, b in zip(found[None], found[False], strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    plan = {"version": 2, "model": "unused", "convert": [{"layers": "all", "mixer": mixer, "options": {}}]}
    deep = tiny_model("llama", num_hidden_layers=8, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=64)  # fmt: skip
    model = surgery.convert(surgery.load_plan(plan, registry), deep).to("cuda", torch.bfloat16).train()
    model.requires_grad_(False)
    cfg = model.config
    T = 2048
    x = torch.randn(1, T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16,
                    generator=torch.Generator("cuda").manual_seed(0))  # fmt: skip
    saved, peaks = {}, {}
    for on in (False, None):  # warm-up: Triton compiles and autotunes (with buffers of its own) outside the window
        set_recompute(model, on)  # type: ignore[arg-type]
        grads(model, x)
    for on in (False, None):
        set_recompute(model, on)  # type: ignore[arg-type]
        saved[on] = mixing_saved_bytes(model, x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        grads(model, x)
        torch.cuda.synchronize()
        peaks[on] = torch.cuda.max_memory_allocated() - before
    D = cfg.head_dim
    inputs = T * 2 * (2 * cfg.hidden_size + 2 * cfg.num_attention_heads * D + 2 * cfg.num_key_value_heads * D)
    assert saved[None] <= inputs * cfg.num_hidden_layers, (saved, inputs)  # x (twice: a copy may be kept), q, o, k, v
    assert saved[None] < saved[False], saved
    assert peaks[None] <= peaks[False], peaks


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
