"""Routing and bucketed dispatch for the ``mom`` mixer: top-k routing, the load-balancing loss, and one ``recur``.

Each token goes to ``k`` of the ``M`` memories. A memory is a gated linear recurrence that sees only the tokens
routed to it, in their order, so per sequence b the tokens of memory m form one variable-length segment. All
``B * M`` segments are packed (segment ``b * M + m``, empty ones included) and run by a single ``recur`` call with
``cu_seqlens``; each segment starts from, and ends in, its own state. Outputs are unpacked and summed with the
routing weights. Nothing loops over memories or sequences in Python and nothing reads a value back to the host:
segment lengths come from a scatter-add, not ``bincount`` (which synchronises on CUDA to size its output).

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


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x.index_select(0, index)`` ``[len(index), ...]`` for distinct indices (a permutation or a selection).

    Same values and gradients as ``index_select``; its backward copies rows where ``index_select``'s adds them.
    """
    return _TakeRows.apply(x, index) if torch.is_grad_enabled() and x.requires_grad else x.index_select(0, index)


def dispatch(
    recur: Recur,
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    gates: Tensor | None,
    routing: Routing,
    valid: Tensor | None,
    state: tuple[Tensor, ...] | None,
    want_state: bool,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """The routed memories' output: ``sum_j weights_j * memory_{experts_j}(token)``, and their new states.

    Args:
        recur: the recurrence every memory runs (one call, or one per decode step).
        q: ``[B, T, Hq, D]`` shared queries.
        keys, values: ``[B, T, M, Hkv, D]`` every memory's key and value for every token.
        gates: ``[B, T, M, Hkv, D]`` gate inputs, or None when the gate is the key itself.
        routing: the router's decision, ``[B, T, k]``.
        valid: ``[B, T]`` bool (False: left padding, an identity step in the memories it is routed to) or None.
        state: the recurrence's state tuple with every entry ``[B, M, ...]`` (one state per sequence and memory),
            or None for zeros.
        want_state: return the new state tuple (same layout).

    Returns:
        ``o`` ``[B, T, Hq, D]`` fp32 and the state tuple or None.
    """
    if q.shape[1] == 1:
        return _decode_step(recur, q, keys, values, gates, routing, valid, state, want_state)
    B, T, M = keys.shape[:3]
    k = routing.experts.shape[-1]
    R = B * T * k
    # Row r = (token, choice); token = b * T + t. Segment b * M + m; a stable sort keeps each segment in time order.
    tok = torch.arange(B * T, device=q.device).repeat_interleave(k)
    mem = routing.experts.reshape(R)
    seg = tok.div(T, rounding_mode="floor") * M + mem
    order = torch.argsort(seg, stable=True)
    tok_s = tok[order]
    flat = tok_s * M + mem[order]  # row of [B * T * M] holding this (token, memory); each at most once
    lengths = torch.zeros(B * M, dtype=torch.long, device=q.device).index_add_(0, seg, torch.ones_like(seg))
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))

    def rows(x: Tensor) -> Tensor:  # [B, T, M, H, D] -> [1, R, H, D], packed by segment
        return take_rows(x.reshape(B * T * M, *x.shape[3:]), flat).unsqueeze(0)

    # Queries: each token's row repeated k times (a copy in (token, choice) order), then permuted, so that the
    # backward is a permutation and a sum over k instead of an atomic scatter-add of repeated rows.
    q_rep = q.reshape(B * T, 1, *q.shape[2:]).expand(B * T, k, *q.shape[2:]).reshape(R, *q.shape[2:])
    q_s = take_rows(q_rep, order).unsqueeze(0)
    k_s, v_s = rows(keys), rows(values)
    g_s = k_s if gates is None else rows(gates)
    valid_s = None if valid is None else valid.reshape(B * T).index_select(0, tok_s).unsqueeze(0)
    init = None if state is None else tuple(s.reshape(B * M, *s.shape[2:]) for s in state)
    o, final = recur(q_s, k_s, v_s, g_s, valid_s, init, want_state, cu_seqlens=cu_seqlens)
    # Back to (token, choice) order: the inverse permutation, built by a scatter (no sort, no sync).
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(R, device=q.device))
    o = take_rows(o[0], inverse).view(B, T, k, *o.shape[2:])
    out = (o * routing.weights[..., None, None]).sum(2)
    if not want_state or final is None:
        return out, None
    return out, tuple(s.view(B, M, *s.shape[1:]) for s in final)


def _decode_step(
    recur: Recur,
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    gates: Tensor | None,
    routing: Routing,
    valid: Tensor | None,
    state: tuple[Tensor, ...] | None,
    want_state: bool,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """``dispatch`` for ``T = 1``: the ``B * k`` chosen (sequence, memory) states form one batch of the token kernel.

    The state update writes only those ``B * k`` entries (in place when no gradient is recorded: the cache owns
    the tensor, and copying every memory's state per token would cost M / k times the work of the step).
    """
    B, _, M = keys.shape[:3]
    k = routing.experts.shape[-1]
    b = torch.arange(B, device=q.device).repeat_interleave(k)
    mem = routing.experts.reshape(B * k)

    def rows(x: Tensor) -> Tensor:  # [B, 1, M, H, D] -> [B * k, 1, H, D]
        return x[:, 0][b, mem].unsqueeze(1)

    q_r = q.repeat_interleave(k, dim=0)
    k_r, v_r = rows(keys), rows(values)
    g_r = k_r if gates is None else rows(gates)
    valid_r = None if valid is None else valid.repeat_interleave(k, dim=0)
    init = None if state is None else tuple(s[b, mem] for s in state)
    o, final = recur(q_r, k_r, v_r, g_r, valid_r, init, want_state)
    out = (o.view(B, k, *o.shape[2:]) * routing.weights.view(B, k, 1, 1)).sum(1, keepdim=True)
    if not want_state or final is None:
        return out, None
    if state is None:
        state = tuple(f.new_zeros(B, M, *f.shape[1:]) for f in final)
    if torch.is_grad_enabled():
        return out, tuple(s.index_put((b, mem), f) for s, f in zip(state, final))
    for s, f in zip(state, final):
        s.index_put_((b, mem), f.to(s.dtype))
    return out, state
