"""The retrieval memory's prefill and training as batched work: ``memory_branch`` without its loop over spans.

``surgery.retrieval.memory_branch`` is the reference: it runs the recurrence, the consolidation and one attention
call per span of ``C`` queries. For a call that starts its sequences (no cache, or an empty one) without padding,
the same result comes from three passes over the whole call:

1. **States.** The recurrent state at every consolidation, positions ``W + jC`` (j >= 1), from one chunked pass
   (``surgery.kernels.gla.states.gla_states_at``: on CUDA, the Triton chunk kernel's state pass).
2. **Selection.** The memory after each consolidation, as token indices ``[B, H, J, n]``: on CUDA one Triton
   launch walks every consolidation (``surgery.kernels.liger.memory_select``); its PyTorch form, ``select_memories``,
   loops over the J consolidations on index tensors of ``n + C`` slots (``retrieval.keep``, the reference's own
   rule), with no attention and no recurrence in it.
3. **Attention.** Span j holds the queries ``[W + jC, W + (j+1)C)``; each sees the sinks, the memory after
   consolidation j and the dense keys ``[jC, W + (j+1)C)`` (causally). Their keys are gathered into one
   ``[B, H, J, L]`` layout, ``L = sinks + n + W + C``, and every span is one row of a single SDPA call (spans as
   batch, GQA's query heads as heads). The first ``W + C`` queries, before any consolidation, are plain causal
   attention over their own prefix.

The attention reads ``T * L`` scores instead of the base's ``T^2 / 2``, and gradients reach every key and value
through the gathers, as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from surgery.cache import MixerCacheLayer, State
from surgery.retrieval import _align, _grow, keep

#: Whether ``applies`` may route a call here; tests switch it off to run the reference on the same inputs.
ENABLED = True


def applies(layer: MixerCacheLayer | None, valid: Tensor | None, softcap: float | None, null: object) -> bool:
    """Whether this call can run batched: it starts its sequences (no cache, or an empty one), has no padding, no
    soft-capping and no shared normalizer (those take ``memory_branch``)."""
    fresh = layer is None or (layer.seen == 0 and layer.keys is None and "mem_k" not in layer.aux)
    return ENABLED and fresh and valid is None and softcap is None and null is None


def consolidation_count(T: int, window: int, chunk: int) -> int:
    """Consolidations in a call of ``T`` tokens from position 0: at positions ``W + jC < T``, j >= 1."""
    return max(0, (T - 1 - window) // chunk)


def select_memories(fk: Tensor, vt: Tensor, cand_ok: Tensor, states: Tensor, chunk: int, n: int) -> tuple[Tensor, Tensor]:
    """The memory after each consolidation, as token indices.

    Args:
        fk: ``[B, H, T, K]`` key features; vt: ``[B, H, T, Dv]`` values; cand_ok: ``[B, T]`` bool (False: a sink,
            never a candidate). states: ``[B, H, J, K, Dv]``, the state at each consolidation.

    Returns:
        ``idx`` ``[B, H, J, m]`` long and ``ok`` ``[B, H, J, m]`` bool, ``m = min(n, J * C)``: after consolidation
        j (0-based), the kept tokens in order of arrival, then empty slots (``ok`` False, index 0).
    """
    B, H, J = states.shape[:3]
    m = min(n, J * chunk)
    dev = fk.device
    idx = torch.zeros(B, H, J, m, dtype=torch.long, device=dev)
    ok = torch.zeros(B, H, J, m, dtype=torch.bool, device=dev)
    mem_i = torch.zeros(B, H, 0, dtype=torch.long, device=dev)
    mem_ok = torch.zeros(B, H, 0, dtype=torch.bool, device=dev)
    block = torch.arange(chunk, device=dev)
    for j in range(J):  # block j is consolidated with the state at W + (j + 1) C
        cand = (j * chunk + block).expand(B, H, chunk)
        both_i = torch.cat([mem_i, cand], 2)
        both_ok = torch.cat([mem_ok, cand_ok[:, None, j * chunk : (j + 1) * chunk].expand(B, H, chunk)], 2)
        f = fk.gather(2, both_i[..., None].expand(-1, -1, -1, fk.shape[-1]))
        v = vt.gather(2, both_i[..., None].expand(-1, -1, -1, vt.shape[-1]))
        top = keep(f, v, both_ok, states[:, :, j], n)
        mem_i, mem_ok = both_i.gather(2, top), both_ok.gather(2, top)
        mem_i = mem_i.masked_fill(~mem_ok, 0)
        idx[:, :, j, : mem_i.shape[2]], ok[:, :, j, : mem_ok.shape[2]] = mem_i, mem_ok
    return idx, ok


def memory_batched(
    qr: Tensor,
    kr: Tensor,
    vt: Tensor,
    fk: Tensor,
    layer: MixerCacheLayer | None,
    window: int,
    chunk: int,
    n: int,
    scale: float,
    sinks: dict[str, Tensor] | None,
    states_at: Callable[[int, int, int], Tensor],
    recur: Callable[[int, int, State | None], tuple[Tensor | None, State]],
    output_used: bool = True,
) -> tuple[Tensor, Tensor | None, State | None, tuple[Tensor, Tensor, None], dict[str, Tensor] | None]:
    """``memory_branch`` for a call that ``applies``: the same outputs, cache and gradients, batched.

    Args:
        qr, kr, vt, fk, window, chunk, n, scale, sinks, recur: as ``memory_branch``.
        states_at: ``(first, step, count) -> [B, H, count, K, Dv]`` fp32, the recurrent states after ``first + j *
            step`` tokens of this call (``gla_states_at`` on the branch's GLA form).
        output_used: whether the recurrent output is mixed in (False with ``w_rec: 0``): without it and without a
            cache, the recurrence does not run at all (the states come from ``states_at``).

    Returns:
        As ``memory_branch``; the aux is None without a cache.
    """
    B, Hq, T, D = qr.shape
    H, Dv = kr.shape[1], vt.shape[-1]
    G = Hq // H
    dev = qr.device
    J = consolidation_count(T, window, chunk)
    rec, state = recur(0, T, None) if (output_used or layer is not None) else (None, None)
    head = min(T, window + chunk)  # queries before the first consolidation: causal attention over their prefix
    # Attention in the inputs' dtype (fp32 models: fp32, as the reference; bf16 on the GPU: the gathered keys and
    # what the backward keeps take half the memory), outputs in fp32.
    rows = qr[:, :, :head].reshape(B, H, G * head, D)  # a query group's G heads as rows
    causal = torch.ones(head, head, dtype=torch.bool, device=dev).tril().repeat(G, 1)
    out = [torch.nn.functional.scaled_dot_product_attention(rows, kr[:, :, :head].to(qr.dtype),
                                                            vt[:, :, :head].to(qr.dtype), attn_mask=causal,
                                                            scale=scale).reshape(B, Hq, head, Dv).float()]
    idx = ok = None
    if J > 0:
        cand_ok = torch.ones(B, T, dtype=torch.bool, device=dev)
        if sinks is not None:  # a sink is never a memory candidate: it is always visible anyway
            pos = torch.arange(T, device=dev)
            cand_ok &= ~((sinks["sink_pos"][:, :, None] == pos) & sinks["sink_ok"][:, :, None]).any(1)
        with torch.no_grad():
            states = states_at(window + chunk, chunk, J)
            idx, ok = _select(fk, vt, cand_ok, states[..., :Dv], chunk, n)
        out.append(_spans(qr, kr, vt, idx, ok, sinks, window, chunk, scale, J))
    o = torch.cat(out, 2)[:, :, :T]
    if layer is None:
        return o, rec, state, (kr, vt, None), None
    last_i = idx[:, :, -1] if idx is not None else torch.zeros(B, H, 0, dtype=torch.long, device=dev)
    last_ok = ok[:, :, -1] if ok is not None else torch.zeros(B, H, 0, dtype=torch.bool, device=dev)
    mem = {"k": _take(kr, last_i), "v": _take(vt, last_i), "fk": _take(fk.float(), last_i), "ok": last_ok}
    mem = {name: (t if name == "ok" else t * last_ok[..., None]) for name, t in mem.items()}
    aux = {f"mem_{name}": _grow(t, n) for name, t in mem.items()} | {
        "win_fk": _align(fk.float(), window + chunk).clone(),
        "mem_start": torch.ones(B, dtype=torch.long, device=dev),
        "mem_real": torch.full((B,), T, dtype=torch.long, device=dev),
        "mem_pad": torch.zeros(B, dtype=torch.long, device=dev)}  # fmt: skip
    return o, rec, state, (kr, vt, None), aux


def _select(fk: Tensor, vt: Tensor, cand_ok: Tensor, states: Tensor, chunk: int, n: int) -> tuple[Tensor, Tensor]:
    """``select_memories``: on CUDA the Triton kernel (every consolidation in one launch), else PyTorch."""
    if fk.is_cuda:
        try:
            from surgery.kernels.liger.memory_select import memory_select_triton
        except Exception:  # noqa: BLE001 - no usable Triton: the PyTorch loop
            return select_memories(fk, vt, cand_ok, states, chunk, n)
        return memory_select_triton(fk, vt, cand_ok, states, chunk, n)
    return select_memories(fk, vt, cand_ok, states, chunk, n)


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """``x`` ``[B, H, T, D]`` at token indices ``idx`` ``[B, H, *S]`` -> ``[B, H, *S, D]``."""
    flat = idx.reshape(*idx.shape[:2], -1)
    return x.gather(2, flat[..., None].expand(-1, -1, -1, x.shape[-1])).view(*idx.shape, x.shape[-1])


def _spans(qr: Tensor, kr: Tensor, vt: Tensor, idx: Tensor, ok: Tensor, sinks: dict[str, Tensor] | None,
           window: int, chunk: int, scale: float, J: int) -> Tensor:
    """Queries ``[W + jC, W + (j+1)C)`` for j = 1..J, each span over sinks + its memory + its dense keys, in one
    SDPA call -> ``[B, Hq, J * C, Dv]`` fp32 (rows past the call's end are padding)."""
    B, Hq, T, D = qr.shape
    H, Dv = kr.shape[1], vt.shape[-1]
    G, C, W = Hq // H, chunk, window
    dev = qr.device
    end = W + (J + 1) * C  # the last span's last query + 1, at most T + C - 1
    pad = end - T
    dt = qr.dtype
    q = torch.nn.functional.pad(qr[:, :, W + C :], (0, 0, 0, pad))  # [B, Hq, J * C, D]
    q = q.view(B, H, G, J, C, D).permute(0, 1, 3, 2, 4, 5)  # [B, H, J, G, C, D]
    kp = torch.nn.functional.pad(kr.to(dt), (0, 0, 0, pad))
    vp = torch.nn.functional.pad(vt.to(dt), (0, 0, 0, pad))
    # Dense keys of span j: [jC, jC + W + C), windows of W + C rows every C rows from row C.
    dk = kp[:, :, C:].unfold(2, W + C, C)[:, :, :J].transpose(-1, -2)  # [B, H, J, W + C, D]
    dv = vp[:, :, C:].unfold(2, W + C, C)[:, :, :J].transpose(-1, -2)
    keys, vals = [_take(kp, idx), dk], [_take(vp, idx), dv]
    j = torch.arange(1, J + 1, device=dev)
    qpos = W + j[:, None] * C + torch.arange(C, device=dev)  # [J, C]
    kpos = j[:, None] * C + torch.arange(W + C, device=dev)  # [J, W + C]
    dense = (kpos[:, None, :] <= qpos[:, :, None]) & (kpos[:, None, :] < T)  # [J, C, W + C]
    vis = [ok[:, :, :, None, :].expand(B, H, J, C, idx.shape[-1]), dense.expand(B, H, J, C, W + C)]
    if sinks is not None:
        s = sinks["sink_k"].shape[2]
        keys.insert(0, sinks["sink_k"].to(dt)[:, :, None].expand(B, H, J, s, D))
        vals.insert(0, sinks["sink_v"].to(dt)[:, :, None].expand(B, H, J, s, Dv))
        sv = sinks["sink_ok"][:, None, :] & (sinks["sink_pos"][:, None, :] < j[None, :, None] * C)  # [B, J, s]
        vis.insert(0, sv[:, None, :, None, :].expand(B, H, J, C, s))
    k_all = torch.cat(keys, 3).reshape(B * H * J, 1, -1, D)
    v_all = torch.cat(vals, 3).reshape(B * H * J, 1, -1, Dv)
    mask = torch.cat(vis, 4).reshape(B * H * J, 1, C, -1)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(B * H * J, G, C, D), k_all.expand(-1, G, -1, -1), v_all.expand(-1, G, -1, -1), attn_mask=mask,
        scale=scale)  # fmt: skip
    return o.view(B, H, J, G, C, Dv).permute(0, 1, 3, 2, 4, 5).reshape(B, Hq, J * C, Dv).float()
