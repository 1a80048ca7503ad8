"""Routing and bucketed dispatch for the ``mom`` mixer: top-k routing, the load-balancing loss, and one ``recur``.

Each token goes to ``k`` of the ``M`` memories. A memory is a gated linear recurrence that sees only the tokens
routed to it, in their order, so per sequence b the tokens of memory m form one variable-length segment. All
``M * B`` segments are packed (segment ``m * B + b``, empty ones included) and run by a single ``recur`` call with
``cu_seqlens``; each segment starts from, and ends in, its own state. Rows grouped by memory are also what a grouped
GEMM takes, so each row's key/value can be projected by its own memory alone (``MemoryRows``). Outputs are unpacked
and summed with the routing weights. Nothing loops over memories or sequences in Python and nothing reads a value
back to the host: segment lengths come from a scatter-add, not ``bincount`` (which synchronises on CUDA to size its
output).

Memory: the routed rows are ``k`` times the tokens, so one recurrence over all of them would hold ``k`` outputs,
queries and feature maps per token at once (at B = 16 x 32K on the Llama-3-8B shape, a 16 GiB output). Prefill and
training instead walk the packed rows in pieces of at most half the tokens (``piece_rows``): a piece is a slice of
the packed order with ``cu_seqlens`` clipped to it, its segments start from the states the previous piece ended in
(a segment cut by a piece boundary continues exactly; one the piece does not reach keeps its state), its rows'
queries and keys/values are gathered and projected for it alone, and its weighted output is added in place into
the ``[B * T, ...]`` output. Piece sizes follow from the shapes alone (no sync); nothing is ever ``[M, T, ...]``.

Decoding (one token per sequence) takes a shorter way: the ``B * k`` chosen states are gathered into a batch, run
through the recurrence's token kernel, and written back; the other memories' states are not touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: ``recur(q, k, v, gate, valid, state, want_state, cu_seqlens=None) -> (o, state)`` of a ``RecurrentMixer``.
Recur = Callable[..., tuple[Tensor, "tuple[Tensor, ...] | None"]]


@dataclass(frozen=True)
class Routing:
    """The router's decision for every token.

    Attributes:
        probs: ``[B, T, M]`` fp32 softmax over the memories.
        weights: ``[B, T, k]`` fp32 renormalised top-k probabilities (each row sums to 1).
        experts: ``[B, T, k]`` int64 memory indices, distinct within a row.
    """

    probs: Tensor
    weights: Tensor
    experts: Tensor


def route(logits: Tensor, topk: int) -> Routing:
    """Softmax in fp32 over ``logits`` ``[B, T, M]``, keep the ``topk`` largest, renormalise them to sum to 1."""
    probs = logits.float().softmax(-1)
    top, experts = probs.topk(topk, dim=-1)
    return Routing(probs, top / top.sum(-1, keepdim=True), experts)


def tokens_per_memory(routing: Routing, valid: Tensor | None, num_memories: int) -> Tensor:
    """``[M]`` int64: how many (real token, choice) pairs each memory got; padding counts for none."""
    ones = torch.ones_like(routing.experts)
    if valid is not None:
        ones = ones * valid[..., None].to(ones.dtype)
    counts = torch.zeros(num_memories, dtype=torch.long, device=ones.device)
    return counts.index_add_(0, routing.experts.reshape(-1), ones.reshape(-1))


def load_balancing_loss(routing: Routing, valid: Tensor | None, counts: Tensor) -> Tensor:
    """Switch-style ``M * sum_e frac_e * P_e`` over real tokens: 1 for uniform routing, M when one memory wins.

    ``frac_e`` (share of assignments, from ``counts`` ``[M]``) is a count and carries no gradient; ``P_e`` (mean
    router probability) does, which is what pushes the router towards balance.
    """
    M, k = routing.probs.shape[-1], routing.experts.shape[-1]
    probs = routing.probs if valid is None else routing.probs * valid[..., None].to(routing.probs.dtype)
    n = probs.new_tensor(probs[..., 0].numel()) if valid is None else valid.sum().to(probs.dtype)
    n = n.clamp(min=1.0)
    frac = counts.to(probs.dtype) / (n * k)
    return M * (frac * probs.sum((0, 1)) / n).sum()


class _TakeRows(torch.autograd.Function):
    """``x[index]`` along dim 0 for an ``index`` without repeats; the gradient is written, not scatter-added."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        # index_select's own backward is index_add (atomic adds, slow in bf16); distinct rows need only a copy.
        out = grad.new_zeros(ctx.rows, *grad.shape[1:]) if index.numel() < ctx.rows else grad.new_empty(
            ctx.rows, *grad.shape[1:])
        return out.index_copy_(0, index, grad.contiguous()), None


class _TakeRepeated(torch.autograd.Function):
    """``x[order // k]``: row ``order[r]`` of ``x`` repeated k times; ``order`` a permutation of ``[len(x) * k]``.

    Forward is one gather (no expanded copy of ``x``). Backward writes each row's gradient to its (token, choice)
    slot, which is unique, and sums the k slots of a token: no atomic scatter-add of repeated rows.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(order)
        ctx.k = k
        return x.index_select(0, order.div(k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (order,) = ctx.saved_tensors
        slots = grad.new_empty(grad.shape).index_copy_(0, order, grad.contiguous())
        return slots.view(-1, ctx.k, *grad.shape[1:]).sum(1), None, None


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x.index_select(0, index)`` ``[len(index), ...]`` for distinct indices (a permutation or a selection).

    Same values and gradients as ``index_select``; its backward copies rows where ``index_select``'s adds them.
    """
    return _TakeRows.apply(x, index) if torch.is_grad_enabled() and x.requires_grad else x.index_select(0, index)


@dataclass(frozen=True)
class Packing:
    """Where each routed (token, choice) row sits in the packed order that the recurrence runs.

    Rows come grouped by memory, then by sequence, then in time order: segment ``m * B + b`` holds sequence b's
    tokens routed to memory m. Grouping by memory first is what lets all M projections run as one grouped GEMM.

    Attributes:
        order: ``[R]`` int64, packed row -> (token, choice) row ``token * k + choice`` (``token = b * T + t``).
        memory: ``[R]`` int64, the memory of each packed row (non-decreasing).
        ends: ``[M]`` int32, the end of memory m's rows (``torch._grouped_mm``'s ``offs``).
        topk: k, choices per token.
        whole: every row (``order`` a permutation of ``[B * T * k]``), not a piece of them (``slice``).
    """

    order: Tensor
    memory: Tensor
    ends: Tensor
    topk: int
    whole: bool = True

    def slice(self, start: int, stop: int) -> Packing:
        """Packed rows ``start:stop``, group ends relative to them (a piece of the packed order)."""
        ends = (self.ends - start).clamp(0, stop - start).to(torch.int32)
        return Packing(self.order[start:stop], self.memory[start:stop], ends, self.topk, whole=False)

    @property
    def token(self) -> Tensor:
        """``[R]`` int64: the token (``b * T + t``) of each packed row."""
        return self.order.div(self.topk, rounding_mode="floor")

    def tokens(self, x: Tensor) -> Tensor:
        """Each packed row's token row of ``x`` ``[B * T, ...]``: ``[R, ...]`` (a token's row appears k times)."""
        if not (torch.is_grad_enabled() and x.requires_grad) or not self.whole:
            return x.index_select(0, self.token)  # a piece may hold both choices of a token: index_add backward
        return _TakeRepeated.apply(x, self.order, self.topk)


#: ``rows(packing) -> (k, v, g)``: key, value and gate input ``[R, Hkv, D]`` (``Dv`` for values; g None: the key)
#: of every packed row, each through its own memory's projections.
MemoryRows = Callable[[Packing], tuple[Tensor, Tensor, "Tensor | None"]]


def dense_rows(keys: Tensor, values: Tensor, gates: Tensor | None) -> MemoryRows:
    """``MemoryRows`` that select from every memory's key/value/gate for every token, ``[B, T, M, Hkv, D]`` each."""
    M = keys.shape[2]

    def rows(p: Packing) -> tuple[Tensor, Tensor, Tensor | None]:
        flat = p.token * M + p.memory  # each (token, memory) at most once: a selection without repeats

        def pick(x: Tensor) -> Tensor:
            return take_rows(x.reshape(-1, *x.shape[3:]), flat)

        return pick(keys), pick(values), None if gates is None else pick(gates)

    return rows


def pack(experts: Tensor, num_memories: int) -> tuple[Packing, Tensor]:
    """The packed order of ``experts`` ``[B, T, k]`` and its ``cu_seqlens`` ``[M * B + 1]`` (segment m * B + b).

    A stable sort keeps each segment in time order; lengths come from a scatter-add, not ``bincount`` (which
    synchronises on CUDA to size its output), so nothing here reads a value back to the host.
    """
    B, T, k = experts.shape
    mem = experts.reshape(-1)
    seg = mem * B + torch.arange(B, device=mem.device).repeat_interleave(T * k)
    order = torch.argsort(seg, stable=True)
    lengths = torch.zeros(num_memories * B, dtype=torch.long, device=mem.device)
    cu_seqlens = F.pad(lengths.index_add_(0, seg, torch.ones_like(seg)).cumsum(0), (1, 0))
    ends = cu_seqlens[B::B].to(torch.int32)
    return Packing(order, mem[order], ends, k), cu_seqlens


def piece_rows(tokens: int, topk: int) -> int:
    """Packed rows per recurrence call for ``tokens`` routed ``topk`` times: all of them when that is at most the
    tokens (k = 1), else half the tokens (rounded up to a chunk of 64), so a call's rows never outnumber the tokens."""
    if topk <= 1:
        return tokens
    return max(64, -(-tokens // 2 // 64) * 64)


def dispatch(
    recur: Recur,
    q: Tensor,
    rows: MemoryRows,
    routing: Routing,
    valid: Tensor | None,
    state: tuple[Tensor, ...] | None,
    want_state: bool,
    piece: int | None = None,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """The routed memories' output: ``sum_j weights_j * memory_{experts_j}(token)``, and their new states.

    Args:
        recur: the recurrence every memory runs (one call, or one per decode step).
        q: ``[B, T, Hq, D]`` shared queries.
        rows: each routed row's key/value/gate through its memory (``dense_rows``, or a grouped projection).
        routing: the router's decision, ``[B, T, k]``.
        valid: ``[B, T]`` bool (False: left padding, an identity step in the memories it is routed to) or None.
        state: the recurrence's state tuple with every entry ``[B, M, ...]`` (one state per sequence and memory),
            or None for zeros.
        want_state: return the new state tuple (same layout).
        piece: packed rows per recurrence call (default ``piece_rows``; the module docstring says why).

    Returns:
        ``o`` ``[B, T, Hq, D]`` fp32 and the state tuple or None.
    """
    B, T, k = routing.experts.shape
    M = routing.probs.shape[-1]
    packing, cu_seqlens = pack(routing.experts, M)
    R = B * T * k
    piece = piece_rows(B * T, k) if piece is None else piece
    if T > 1 and piece < R:
        return _in_pieces(recur, q, rows, routing, valid, state, want_state, packing, cu_seqlens, piece)
    k_s, v_s, g_s = rows(packing)
    q_s = packing.tokens(q.reshape(B * T, *q.shape[2:]))
    g_s = k_s if g_s is None else g_s
    valid_s = None if valid is None else valid.reshape(B * T).index_select(0, packing.token)
    if T == 1:
        return _decode_step(recur, q_s, k_s, v_s, g_s, valid_s, packing, routing, state, want_state)
    # Segments are (memory, sequence); the cache keeps states (sequence, memory).
    init = _segment_states(state, M, B)
    o, final = recur(q_s[None], k_s[None], v_s[None], g_s[None], None if valid_s is None else valid_s[None], init,
                     want_state, cu_seqlens=cu_seqlens)  # fmt: skip
    out = _combine(o[0], packing, routing)
    if not want_state or final is None:
        return out, None
    return out, _sequence_states(final, M, B)


def _segment_states(state: tuple[Tensor, ...] | None, M: int, B: int) -> tuple[Tensor, ...] | None:
    """The cache's states ``[B, M, ...]`` as the recurrence's segments ``[M * B, ...]`` (memory-major), or None."""
    return None if state is None else tuple(s.transpose(0, 1).reshape(M * B, *s.shape[2:]) for s in state)


def _sequence_states(final: tuple[Tensor, ...], M: int, B: int) -> tuple[Tensor, ...]:
    """The recurrence's segment states ``[M * B, ...]`` back in the cache's layout ``[B, M, ...]``."""
    return tuple(s.view(M, B, *s.shape[1:]).transpose(0, 1).contiguous() for s in final)


def _in_pieces(
    recur: Recur,
    q: Tensor,
    rows: MemoryRows,
    routing: Routing,
    valid: Tensor | None,
    state: tuple[Tensor, ...] | None,
    want_state: bool,
    packing: Packing,
    cu_seqlens: Tensor,
    piece: int,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """``dispatch`` over the packed rows ``piece`` at a time, states carried from piece to piece, each piece's
    weighted output added into ``[B * T, Hq, D]`` in place (``index_add``: the k choices of a token may share one)."""
    B, T, k = routing.experts.shape
    M = routing.probs.shape[-1]
    R = B * T * k
    q_flat = q.reshape(B * T, *q.shape[2:])
    weights = routing.weights.reshape(R)
    valid_flat = None if valid is None else valid.reshape(B * T)
    st = _segment_states(state, M, B)
    out: Tensor | None = None
    for start in range(0, R, piece):
        stop = min(R, start + piece)
        part = packing.slice(start, stop)
        token = part.token
        k_s, v_s, g_s = rows(part)
        g_s = k_s if g_s is None else g_s
        q_s = part.tokens(q_flat)
        valid_s = None if valid_flat is None else valid_flat.index_select(0, token)[None]
        cu = (cu_seqlens - start).clamp(0, stop - start)
        last = stop == R
        o, st = recur(q_s[None], k_s[None], v_s[None], g_s[None], valid_s, st, want_state or not last, cu_seqlens=cu)
        part_out = o[0].float() * weights[part.order][:, None, None]
        if out is None:
            out = part_out.new_zeros(B * T, *part_out.shape[1:])
        out = out.index_add_(0, token, part_out)
        del o, part_out, q_s, k_s, v_s, g_s
    assert out is not None  # R >= 1
    out = out.view(B, T, *out.shape[1:])
    if not want_state or st is None:
        return out, None
    return out, _sequence_states(st, M, B)


def _combine(o: Tensor, packing: Packing, routing: Routing) -> Tensor:
    """``o`` ``[R, Hq, D]`` in packed order -> ``[B, T, Hq, D]``: back to (token, choice) order, weighted, summed."""
    B, T, k = routing.experts.shape
    R = o.shape[0]
    # The inverse permutation, built by a scatter (no sort, no sync).
    inverse = torch.empty_like(packing.order).scatter_(0, packing.order, torch.arange(R, device=o.device))
    o = take_rows(o, inverse).view(B, T, k, *o.shape[1:])
    return (o * routing.weights[..., None, None]).sum(2)


def _decode_step(
    recur: Recur,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    valid: Tensor | None,
    packing: Packing,
    routing: Routing,
    state: tuple[Tensor, ...] | None,
    want_state: bool,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """``dispatch`` for ``T = 1``: the ``B * k`` chosen (sequence, memory) states form one batch of the token kernel.

    ``q``/``k``/``v``/``g`` are the packed rows ``[B * k, H, D]``. The state update writes only those ``B * k``
    entries (in place when no gradient is recorded: the cache owns the tensor, and copying every memory's state per
    token would cost M / k times the work of the step).
    """
    B, M = routing.probs.shape[0], routing.probs.shape[-1]
    b, mem = packing.token, packing.memory  # T = 1: the token is the sequence
    init = None if state is None else tuple(s[b, mem] for s in state)
    o, final = recur(q[:, None], k[:, None], v[:, None], g[:, None], None if valid is None else valid[:, None], init,
                     want_state)  # fmt: skip
    out = _combine(o[:, 0], packing, routing)
    if not want_state or final is None:
        return out, None
    if state is None:
        state = tuple(f.new_zeros(B, M, *f.shape[1:]) for f in final)
    if torch.is_grad_enabled():
        return out, tuple(s.index_put((b, mem), f) for s, f in zip(state, final))
    for s, f in zip(state, final):
        s.index_put_((b, mem), f.to(s.dtype))
    return out, state
