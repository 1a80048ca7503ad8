"""The retrieval memory's Triton selection (``kernels/liger/memory_select.py``) against ``select_memories``, the
PyTorch selection that ``tests/test_retrieval_batched.py`` holds to the span-by-span reference: the same kept tokens
in the same order, after every consolidation. Interpreter on CPU; the real kernel on the device (``-m gpu``)."""

from __future__ import annotations

import pytest
import torch

from surgery.retrieval_batched import select_memories

triton = pytest.importorskip("triton")


def _inputs(B: int, H: int, T: int, K: int, V: int, J: int, device: str, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    fk = torch.randn(B, H, T, K, generator=g).softmax(-1)
    v = torch.randn(B, H, T, V, generator=g)
    v[:, :, 5] = v[:, :, 3]  # a repeated token: the same features and value, a tie the older slot must win
    fk[:, :, 5] = fk[:, :, 3]
    cand_ok = torch.rand(B, T, generator=g) > 0.1  # some tokens are sinks: never candidates
    states = torch.randn(B, H, J, K, V, generator=g) / K
    return tuple(x.to(device) for x in (fk, v, cand_ok, states))


@pytest.mark.parametrize(("n", "chunk", "J"), [(3, 2, 6), (8, 4, 5), (5, 8, 3), (16, 4, 2)])
def test_triton_selection_equals_torch(n: int, chunk: int, J: int) -> None:
    from surgery.kernels.liger.memory_select import memory_select_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    T = J * chunk + 3
    fk, v, cand_ok, states = _inputs(2, 2, T, 8, 8, J, device)
    idx, ok = memory_select_triton(fk, v, cand_ok, states, chunk, n)
    ref_idx, ref_ok = select_memories(fk, v, cand_ok, states, chunk, n)
    assert torch.equal(ok.cpu(), ref_ok.cpu())
    assert torch.equal(idx.cpu(), ref_idx.cpu())
    # The last memory holds every candidate the row had, up to n.
    had = cand_ok[:, : J * chunk].sum(1).clamp(max=n)
    assert torch.equal(ok[:, :, -1].sum(-1).cpu(), had[:, None].expand(-1, ok.shape[1]).cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dim", [64, 128])
def test_triton_selection_at_the_main_jobs_size_on_cuda(dim: int) -> None:
    """n 512, C 64, 32 consolidations (a 2K prefill), heads of 64 (SmolLM2) and 128 (Llama-3-8B)."""
    from surgery.kernels.liger.memory_select import memory_select_triton

    fk, v, cand_ok, states = _inputs(1, 4, 33 * 64, dim, dim, 32, "cuda")
    idx, ok = memory_select_triton(fk, v, cand_ok, states, 64, 512)
    ref_idx, ref_ok = select_memories(fk, v, cand_ok, states, 64, 512)
    # Scores are rounded to 2^-12 from sums taken in another order: a slot at a rounding boundary may fall the
    # other way, and nothing else may differ. Compared as sets of kept tokens per consolidation.
    def kept(i: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*i.shape[:3], 33 * 64, device="cuda").scatter_(3, i, o.float())

    a, b = kept(idx, ok), kept(ref_idx, ref_ok)
    assert ok.sum() == ref_ok.sum() and (a != b).sum() <= 1e-3 * b.sum()
