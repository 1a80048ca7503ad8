"""The retrieval memory batched (``surgery.retrieval_batched``) against its reference, ``retrieval.memory_branch``:
the same logits, gradients and cache, on odd lengths, GQA, sinks and a memory that must evict."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import surgery
from surgery import retrieval_batched
from surgery.generate import cache_kwarg
from surgery.kernels.gla.states import gla_states_at
from surgery.kernels.gla.torch_ops import torch_gla_state
from tests.models import tiny_model

OPTIONS = [
    {"window": 2, "memory": 3, "memory_chunk": 2, "sinks": 1, "w_swa": 1.0, "w_rec": 0.0},
    {"window": 3, "memory": 5, "memory_chunk": 4},
    {"window": 4, "memory": 2, "memory_chunk": 3, "sinks": 2, "w_rec": 0.3},
    {"window": 0, "memory": 4, "memory_chunk": 2},
]


def _model(options: dict[str, Any], arch: str = "llama") -> Any:
    torch.manual_seed(0)
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id",
                              "convert": [{"layers": "all", "mixer": "liger_attention", "options": options}]})  # fmt: skip
    return surgery.convert(plan, tiny_model(arch))


def _ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


def _run(model: Any, x: torch.Tensor, batched: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, dict]:
    """Logits and the gradient of every trainable parameter, with the batched path on or off."""
    monkeypatch.setattr(retrieval_batched, "ENABLED", batched)
    model.zero_grad()
    logits = model(x).logits
    (logits.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("T", [1, 7, 29, 40])
def test_batched_equals_the_reference(options: dict[str, Any], T: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and every gradient, on lengths below, at and past several consolidations (the memory evicts)."""
    model = _model(options, arch="qwen2")  # GQA: two query heads per key/value head
    x = _ids(2, T)
    ref, ref_grads = _run(model, x, False, monkeypatch)
    out, grads = _run(model, x, True, monkeypatch)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=1e-6, msg=name)


def test_batched_path_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncached forwards and prefills take it; padded or continued calls take the reference."""
    model = _model(OPTIONS[0])
    calls: list[int] = []
    real = retrieval_batched.memory_batched
    monkeypatch.setattr(retrieval_batched, "memory_batched", lambda *a, **k: calls.append(1) or real(*a, **k))
    n_layers = model.config.num_hidden_layers
    x = _ids(1, 20)
    with torch.no_grad():
        model(x, use_cache=False)
        assert len(calls) == n_layers
        out = model(x, use_cache=True)
        assert len(calls) == 2 * n_layers
        model(x[:, :3], use_cache=True, **{cache_kwarg(model): out.past_key_values})
        model(x, attention_mask=torch.ones_like(x).index_fill(1, torch.tensor([0]), 0))
    assert len(calls) == 2 * n_layers


@pytest.mark.parametrize("options", OPTIONS[:3], ids=["sinks1", "plain", "sinks2_rec"])
def test_batched_prefill_then_reference_decode(options: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache a batched prefill leaves (memory, key-feature window, positions) continues token by token as
    the whole sequence in one reference forward: decoding reads the memory the batched selection chose."""
    model = _model(options)
    x = _ids(2, 31, seed=1)
    name = cache_kwarg(model)
    with torch.no_grad():
        monkeypatch.setattr(retrieval_batched, "ENABLED", False)
        whole = model(x).logits
        monkeypatch.setattr(retrieval_batched, "ENABLED", True)
        first = model(x[:, :19], use_cache=True)
        cache, steps = first.past_key_values, [first.logits]
        for t in range(19, 31):
            out = model(x[:, t : t + 1], use_cache=True, **{name: cache})
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("first", "step", "count", "T"), [(0, 4, 3, 9), (5, 3, 4, 17), (8, 8, 3, 24), (2, 1, 1, 2)])
def test_states_at_positions(first: int, step: int, count: int, T: int) -> None:
    torch.manual_seed(0)
    k = torch.randn(2, T, 3, 4).softmax(-1)
    v = torch.randn(2, T, 3, 5)
    gk = -torch.rand(2, T, 3, 4)
    got = gla_states_at(k, v, gk, None, first, step, count)
    for j in range(count):
        p = first + j * step
        want = torch_gla_state(k[:, :p], v[:, :p], gk[:, :p], chunk_size=1)
        torch.testing.assert_close(got[:, :, j], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must lie in"):
        gla_states_at(k, v, gk, None, first, step, count + T)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [64, 200, 256])
def test_states_at_chunk_starts_on_cuda(T: int) -> None:
    """The Triton state pass (positions at chunk starts) against the PyTorch form."""
    torch.manual_seed(0)
    k = torch.randn(2, T, 3, 64, device="cuda").softmax(-1)
    v = torch.randn(2, T, 3, 64, device="cuda")
    gk = -torch.rand(2, T, 3, 64, device="cuda") / 16
    count = (T - 64) // 64 + 1
    got = gla_states_at(k, v, gk, None, 64, 64, count)
    want = gla_states_at(k.cpu(), v.cpu(), gk.cpu(), None, 64, 64, count)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_equals_the_reference_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Window 64 and chunks of 64: the Triton state pass and the Triton selection, against the span loop."""
    model = _model({"window": 64, "memory": 128, "memory_chunk": 64, "sinks": 4, "w_swa": 1.0, "w_rec": 0.0}).cuda()
    x = _ids(2, 600).cuda()
    ref, ref_grads = _run(model, x, False, monkeypatch)
    out, grads = _run(model, x, True, monkeypatch)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-2, atol=1e-5, msg=name)
