"""The retrieval memory's selection in Triton: every consolidation of a call in one launch.

Reference: ``surgery.retrieval_batched.select_memories`` (PyTorch, a loop over consolidations on index tensors),
itself checked against ``surgery.retrieval.memory_branch``. One program per (row, key/value head) walks the J
consolidations in order, since each keeps what the previous one kept:

1. The slots: the memory after the previous consolidation (row ``j - 1`` of the output), then block j's C
   candidates; ``cnt = min(n, j * C)`` memory slots, so ``cnt + C`` slots in all, laid out in order of arrival.
2. Their scores ``1 - cos(v, fk S_j)`` block by block (``tl.dot`` in IEEE fp32, never TF32: the score is rounded to
   2^-12 and a tie must fall as in PyTorch), rounded as ``retrieval.keep`` rounds, packed with the slot's place into
   one int64 key (score high, place low and reversed), so one descending sort orders by score and breaks ties
   toward the older slot, as the stable sort of the reference does; empty slots rank below every real one.
3. The ``min(n, cnt + C)``-th largest key is the threshold; the kept real slots are written to row j in order of
   arrival (a prefix sum gives each its place), then the empty ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

PLACE = 1 << 24  # a slot's place in the key: up to 2**24 slots (n + C)


@triton.jit
def _slots(p, cnt, j, prev_idx, prev_ok, cand_ok, C: tl.constexpr):
    """Token index and ok flag of slot places ``p``: the previous memory's first, then block j's candidates."""
    is_mem = p < cnt
    is_cand = (p >= cnt) & (p < cnt + C)
    mi = tl.load(prev_idx + p, mask=is_mem, other=0)
    mo = tl.load(prev_ok + p, mask=is_mem, other=0)
    ci = j * C + (p - cnt)
    co = tl.load(cand_ok + ci, mask=is_cand, other=0)
    idx = tl.where(is_mem, mi, tl.where(is_cand, ci, 0))
    ok = tl.where(is_mem, mo, tl.where(is_cand, co, 0))
    return idx, ok


@triton.jit
def memory_select_kernel(fk, v, cand_ok, states, out_idx, out_ok, keys, T, J, n, M,
                         K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         BS: tl.constexpr, P: tl.constexpr, PLACE: tl.constexpr):
    bh = tl.program_id(0)  # one (row, key/value head); cand_ok is expanded over heads by the host
    fk_row = fk + bh.to(tl.int64) * T * K
    v_row = v + bh.to(tl.int64) * T * V
    ok_row = cand_ok + bh.to(tl.int64) * T
    key_row = keys + bh.to(tl.int64) * P
    kk = tl.arange(0, BK)
    vv = tl.arange(0, BV)
    places = tl.arange(0, P)
    for j in range(J):
        cnt = tl.minimum(n, j * C)
        total = cnt + C
        prev_idx = out_idx + (bh.to(tl.int64) * J + j - 1) * M
        prev_ok = out_ok + (bh.to(tl.int64) * J + j - 1) * M
        s_ptr = states + (bh.to(tl.int64) * J + j) * K * V
        S = tl.load(s_ptr + kk[:, None] * V + vv[None, :], mask=(kk[:, None] < K) & (vv[None, :] < V), other=0.0)
        for blk in range(0, P, BS):
            p = blk + tl.arange(0, BS)
            idx, ok = _slots(p, cnt, j, prev_idx, prev_ok, ok_row, C)
            f = tl.load(fk_row + idx[:, None] * K + kk[None, :], mask=(p[:, None] < total) & (kk[None, :] < K),
                        other=0.0)
            x = tl.load(v_row + idx[:, None] * V + vv[None, :], mask=(p[:, None] < total) & (vv[None, :] < V),
                        other=0.0).to(tl.float32)
            r = tl.dot(f, S, input_precision="ieee")  # [BS, BV] reconstructions
            # torch.cosine_similarity(eps=1e-6): each side over its norm clamped to eps, then the dot product.
            n1 = tl.maximum(tl.sqrt(tl.sum(r * r, 1)), 1e-6)
            n2 = tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-6)
            cos = tl.sum((r / n1[:, None]) * (x / n2[:, None]), 1)
            rounded = _round_half_even((1.0 - cos) * 4096.0)
            score = tl.where((ok != 0) & (p < total), rounded.to(tl.int64) + 1, 0)
            key = score * PLACE + (PLACE - 1 - p).to(tl.int64)
            tl.store(key_row + p, key, mask=p < P)
        tl.debug_barrier()
        key = tl.load(key_row + places)
        key = tl.where(places < total, key, -1)
        ranked = tl.sort(key, descending=True)
        keep_n = tl.minimum(n, total)
        threshold = tl.sum(tl.where(places == keep_n - 1, ranked, 0))
        idx, ok = _slots(places, cnt, j, prev_idx, prev_ok, ok_row, C)
        kept = (key >= threshold) & (places < total) & (ok != 0)
        at = tl.cumsum(kept.to(tl.int32), 0) - 1
        n_kept = tl.sum(kept.to(tl.int32))
        row_idx = out_idx + (bh.to(tl.int64) * J + j) * M
        row_ok = out_ok + (bh.to(tl.int64) * J + j) * M
        tl.store(row_idx + places, tl.zeros([P], dtype=tl.int32), mask=(places >= n_kept) & (places < M))
        tl.store(row_ok + places, tl.zeros([P], dtype=tl.int8), mask=(places >= n_kept) & (places < M))
        tl.store(row_idx + at, idx.to(tl.int32), mask=kept)
        tl.store(row_ok + at, tl.full([P], 1, dtype=tl.int8), mask=kept)
        tl.debug_barrier()


@triton.jit
def _round_half_even(x):
    """``torch.round`` (half to even) of a float32 tensor."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


def memory_select_triton(fk: Tensor, v: Tensor, cand_ok: Tensor, states: Tensor, chunk: int,
                         n: int) -> tuple[Tensor, Tensor]:
    """``select_memories`` in one launch: same arguments and results (``idx`` long, ``ok`` bool)."""
    B, H, T, K = fk.shape
    J, V = states.shape[2], states.shape[-1]
    M = min(n, J * chunk)
    P = triton.next_power_of_2(min(n, J * chunk) + chunk)
    if P > PLACE:
        raise ValueError(f"memory_select_triton: {n} + {chunk} slots exceed {PLACE}")
    dev = fk.device
    out_idx = torch.zeros(B, H, J, M, dtype=torch.int32, device=dev)
    out_ok = torch.zeros(B, H, J, M, dtype=torch.int8, device=dev)
    keys = torch.empty(B * H, P, dtype=torch.int64, device=dev)
    ok = cand_ok[:, None].expand(B, H, T).to(torch.int8).contiguous()
    BS = min(64, P)
    memory_select_kernel[(B * H,)](fk.float().contiguous(), v.contiguous(), ok, states.float().contiguous(), out_idx,
                                   out_ok, keys, T, J, n, M, K=K, V=V, C=chunk, BK=max(16, triton.next_power_of_2(K)),
                                   BV=max(16, triton.next_power_of_2(V)), BS=max(16, BS), P=P, PLACE=PLACE, num_warps=4)  # fmt: skip
    return out_idx.long(), out_ok.bool()
