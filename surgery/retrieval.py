"""A constant-size retrieval memory for Liger Attention's softmax branch (LoLA-like, arXiv 2505.23666).

Besides its window, the softmax branch attends to at most ``N`` past key/value pairs per key/value head, the ones
the recurrent state reconstructs worst: a pair's score is ``1 - cos(v, phi(k) S)`` where ``S`` is the recurrent
state and ``phi`` the recurrent branch's key feature map, so a pair the state already recalls stays out.

Selection is per chunk, at positions fixed in the sequence, so prefill and token-by-token decoding select the
same pairs. With window ``W`` and chunk ``C``, tokens are grouped in aligned blocks ``[jC, (j+1)C)``; block j is
*consolidated* before the query at position ``(j+1)C + W`` runs: its pairs and the memory's are scored with the
state after every earlier token, and the best ``N`` stay. A query at position p sees the memory, and densely every
token from the start of the oldest unconsolidated block, ``C * floor((p - W) / C)``, to itself: between ``W + 1``
and ``W + C`` keys, so never less than the plain window. Between consolidations the memory is fixed, so each span
of up to C queries is one attention call and the recurrence runs span by span (its state at each consolidation is
the span's final state): a loop per chunk, never per token.

The cache keeps the recurrent state, the last ``W + C`` keys/values (and their key features, for scoring), the
memory, and the sinks: constant in the sequence length. The memory's filled slots come first, in order of arrival;
a row has at most ``C`` per consolidation so far, a count known on the host from positions alone, so attention and
scoring read only the slots that can be filled (early in a sequence, most of them are empty).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from surgery.cache import MixerCacheLayer, State

NEG = float("-inf")


def consolidate(
    mem: dict[str, Tensor], cand: dict[str, Tensor], state: Tensor, n: int
) -> dict[str, Tensor]:
    """Keep the ``n`` pairs of ``mem`` and ``cand`` that ``state`` reconstructs worst, per key/value head.

    Args:
        mem, cand: ``k`` (post-RoPE) and ``v`` ``[B, H, M, D]``, ``fk`` (key features) ``[B, H, M, K]``, ``ok``
            ``[B, H, M]`` bool (False: empty slot, padding, or a sink).
        state: ``[B, H, K, V]`` fp32 recurrent state.

    Returns:
        The new memory, ``min(n, M_mem + M_cand)`` slots: the kept pairs first, in order of arrival, then empty ones.
    """
    both = {name: torch.cat([mem[name], cand[name]], dim=2) for name in ("k", "v", "fk", "ok")}
    top = keep(both["fk"], both["v"], both["ok"], state, n)
    out = {name: both[name].gather(2, top[..., None].expand(-1, -1, -1, both[name].shape[-1]))
           for name in ("k", "v", "fk")}  # fmt: skip
    out["ok"] = both["ok"].gather(2, top)
    return out


def keep(fk: Tensor, v: Tensor, ok: Tensor, state: Tensor, n: int) -> Tensor:
    """Which ``n`` of ``M`` slots in order of arrival ``state`` reconstructs worst: ``fk`` ``[B, H, M, K]``, ``v``
    ``[B, H, M, Dv]``, ``ok`` ``[B, H, M]`` (False: never kept before a True slot), ``state`` ``[B, H, K, Dv]`` ->
    slot indices ``[B, H, min(n, M)]``, the kept slots first in order of arrival, then the empty ones."""
    recon = torch.einsum("bhmk,bhkv->bhmv", fk.float(), state.float())
    score = 1 - torch.nn.functional.cosine_similarity(recon, v.float(), dim=-1, eps=1e-6)
    # Rounded, then ties to the older slot (a stable sort): a pair repeated in the text (same token, so the same key
    # features and value) scores exactly alike in exact arithmetic, and prefill and decode must not pick between
    # such pairs by rounding noise (their states differ in the last bits). 2**-12 is far above that noise and far
    # below the score differences that matter.
    score = (score * 4096).round().masked_fill(~ok, NEG)
    top = score.sort(dim=2, descending=True, stable=True).indices[..., :n]
    # Kept pairs first, in order of arrival (ties above go to the older slot), empty slots last: readers may then
    # stop at the number of slots that can be filled.
    empty = ~ok.gather(2, top)
    return top.gather(2, (top + empty * ok.shape[2]).sort(dim=2).indices)


def empty_memory(B: int, H: int, n: int, D: int, K: int, like: Tensor, Dv: int | None = None) -> dict[str, Tensor]:
    """An empty memory of ``n`` pairs: keys ``[B, H, n, D]``, values ``[B, H, n, Dv]`` (Dv defaults to D)."""
    z = like.new_zeros
    return {"k": z(B, H, n, D), "v": z(B, H, n, D if Dv is None else Dv), "fk": z(B, H, n, K, dtype=torch.float32),
            "ok": torch.zeros(B, H, n, dtype=torch.bool, device=like.device)}  # fmt: skip


def filled(n: int, chunk: int, window: int, pad: list[int], p: int) -> int:
    """Slots of an ``n``-pair memory that can hold a pair once every consolidation before position ``p`` ran: ``chunk``
    per consolidation of the row with the most (rows start after ``pad`` left-padding tokens each)."""
    return min(n, chunk * max(max(0, (p - pb - window - 1) // chunk) for pb in pad))


def attend(q: Tensor, keys: Tensor, values: Tensor, visible: Tensor, scale: float, softcap: float | None,
           null_logits: Tensor | None = None) -> Tensor:
    """Softmax attention, GQA by grouping: ``q`` ``[B, Hq, t, D]``, keys/values ``[B, H, L, D]``, ``visible``
    ``[B, H, t, L]`` bool (every query sees at least itself) -> ``[B, Hq, t, D]`` fp32.

    ``null_logits`` ``[B, Hq, t]``: one more key per query with that logit and a marker value
    (``surgery.window.null_column``); the output gains a last column, its softmax weight (no soft-capping then).
    """
    B, Hq, t, D = q.shape
    H = keys.shape[1]
    G = Hq // H
    if null_logits is not None:
        if softcap is not None:
            raise ValueError("attend: null logits with soft-capping are not supported")
        from surgery.window import null_column

        rows = q.float().reshape(B, H, G * t, D)
        mask = visible[:, :, None].expand(B, H, G, t, visible.shape[-1]).reshape(B, H, G * t, -1)
        k, v, bias = null_column(rows, keys.float(), values.float(), mask, null_logits.float().reshape(B, H, G * t))
        out = torch.nn.functional.scaled_dot_product_attention(rows, k, v, attn_mask=bias, scale=scale)
        return out.reshape(B, Hq, t, -1)
    if softcap is None:  # SDPA's fused kernels (2x the einsums on CPU); a query group's G heads become rows
        rows = q.float().reshape(B, H, G * t, D)
        mask = visible[:, :, None].expand(B, H, G, t, visible.shape[-1]).reshape(B, H, G * t, -1)
        out = torch.nn.functional.scaled_dot_product_attention(rows, keys.float(), values.float(), attn_mask=mask,
                                                               scale=scale)  # fmt: skip
        return out.reshape(B, Hq, t, -1)
    s = torch.einsum("bhgtd,bhld->bhgtl", q.float().view(B, H, G, t, D), keys.float()) * scale
    s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible[:, :, None], NEG).softmax(-1)
    return torch.einsum("bhgtl,bhld->bhgtd", s, values.float()).reshape(B, Hq, t, -1)


def memory_branch(
    qr: Tensor,
    kr: Tensor,
    vt: Tensor,
    fk: Tensor,
    valid: Tensor | None,
    layer: MixerCacheLayer | None,
    window: int,
    chunk: int,
    n: int,
    scale: float,
    softcap: float | None,
    sinks: dict[str, Tensor] | None,
    state: State | None,
    recur: Callable[[int, int, State | None], tuple[Tensor | None, State]],
    null: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None, State, tuple[Tensor, Tensor, Tensor | None], dict[str, Tensor]]:
    """The softmax branch with window, sinks and memory, and the recurrent branch run span by span.

    Args:
        qr: ``[B, Hq, T, D]`` post-RoPE queries; kr, vt: ``[B, H, T, D]`` post-RoPE keys and values of this call.
        fk: ``[B, H, T, K]`` the recurrent branch's key features of this call (what the state is read with).
        valid: ``[B, T]`` bool or None. layer: the cache (window ``W + C``), or None.
        sinks: ``update_sinks``'s output (all of the sequence's sinks so far) or None.
        state: the recurrent state before this call. recur: ``(lo, hi, state) -> (o [B, hi - lo, Hq, D], state)``
            runs the recurrent branch on this call's tokens ``lo:hi`` (o None: only the state is wanted).
        null: ``o -> [B, Hq, hi - lo]`` the logits of a marker key per query, from the span's recurrent output
            (``combine: shared``); the softmax output then has one more column, that key's weight. None: none.

    Returns:
        softmax output ``[B, Hq, T, D]`` fp32, recurrent output ``[B, T, Hq, D]`` fp32 (None when ``recur`` gave
        none), the final state, the ``(keys, values, valid)`` window to commit, and the ``aux`` tensors to commit
        (memory and key-feature window; the caller adds the sinks).
    """
    B, Hq, T, D = qr.shape
    H, K = kr.shape[1], fk.shape[-1]
    dev = qr.device
    seen = layer.seen if layer is not None else 0
    aux = layer.aux if layer is not None else {}
    if "mem_k" in aux:
        mem = {name: aux[f"mem_{name}"] for name in ("k", "v", "fk", "ok")}
    else:
        mem = empty_memory(B, H, n, D, K, kr, vt.shape[-1])
    # The dense buffer: cached tokens (at most W + C) followed by this call's.
    if layer is not None and layer.keys is not None:
        kw, vw, vb = layer.window_with(kr, vt, valid)
        fw = torch.cat([_align(aux["win_fk"], layer.keys.shape[2]), fk.float()], dim=2)
    else:
        kw, vw, vb, fw = kr, vt, valid, fk.float()
    S = kw.shape[2]
    first = seen + T - S  # absolute position of buffer index 0
    ok_buf = vb.to(torch.bool) if vb is not None else torch.ones(B, S, dtype=torch.bool, device=dev)
    if sinks is not None:  # a sink is never a memory candidate: it is always visible anyway
        pos = first + torch.arange(S, device=dev)
        is_sink = ((sinks["sink_pos"][:, :, None] == pos) & sinks["sink_ok"][:, :, None]).any(1)
        cand_ok = ok_buf & ~is_sink
    else:
        cand_ok = ok_buf
    # Blocks are aligned to each row's first real token (left padding shifts a row by its padding; right padding
    # does not shift it), so each row has its own consolidation points; spans split at the union of them, and a row
    # consolidates only at its own. ``mem_start``: that token's position + 1, 0 while a row has none yet (so a cache
    # reset to zeros, as a static cache's ``reset`` does, means "no real token yet").
    start = (aux["mem_start"] - 1) if "mem_start" in aux else torch.full((B,), -1, dtype=torch.long, device=dev)
    if valid is not None:
        here = torch.where(valid.any(1), seen + valid.long().argmax(1), torch.full_like(start, -1))
    else:
        here = torch.full_like(start, seen)
    start = torch.where(start >= 0, start, here)
    pad = torch.where(start >= 0, start, torch.full_like(start, seen + T)).tolist()  # one sync per call
    mem = {name: t[:, :, : filled(n, chunk, window, pad, seen)] for name, t in mem.items()}
    cuts = {p: [p - pb >= window + chunk and (p - pb - window) % chunk == 0 for pb in pad]
            for p in range(seen, seen + T)}
    cuts = {p: rows for p, rows in cuts.items() if any(rows)}
    bounds = sorted(set([seen] + list(cuts) + [seen + T]))
    outs, recs = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a in cuts:
            lo = a - window - chunk - first  # the block's buffer indices (the same for every row cutting here)
            sl = slice(lo, lo + chunk)
            cand = {"k": kw[:, :, sl], "v": vw[:, :, sl], "fk": fw[:, :, sl],
                    "ok": cand_ok[:, None, sl].expand(B, H, chunk)}  # fmt: skip
            # The state's value columns (a shared normalizer appends its own, ``z``, after them).
            st = state[0][..., : vt.shape[-1]] if state is not None else kr.new_zeros(B, H, K, vt.shape[-1],
                                                                                     dtype=torch.float32)
            new = consolidate(mem, cand, st, n)
            rows = torch.tensor(cuts[a], device=dev).view(B, 1, 1)
            mem = {name: torch.where(rows if t.dim() == 3 else rows[..., None], t, _grow(mem[name], t.shape[2]))
                   for name, t in new.items()}  # fmt: skip
            m = filled(n, chunk, window, pad, a + 1)
            mem = {name: t[:, :, :m] for name, t in mem.items()}  # the rest is empty (kept pairs come first)
        rec, state = recur(a - seen, b - seen, state)
        recs.append(rec)
        # Each row's dense keys start at its oldest unconsolidated block (its own padding first).
        base = torch.tensor([pb + (max(0, (a - pb - window) // chunk * chunk) if a - pb >= window else 0)
                             for pb in pad], device=dev)  # fmt: skip
        lo_all = int(base.min())
        d0, d1 = lo_all - first, b - first  # dense keys: buffer indices d0 .. d1 - 1
        qpos = torch.arange(a, b, device=dev)
        kpos = torch.arange(lo_all, b, device=dev)
        dense_vis = ((kpos[None, None, :] <= qpos[None, :, None]) & (kpos[None, None, :] >= base[:, None, None])
                     & ok_buf[:, None, d0:d1])  # [B, t, L]  # fmt: skip
        dense_vis = (dense_vis | (kpos[None, :] == qpos[:, None])[None])[:, None]  # a query always sees itself
        keys = [mem["k"], kw[:, :, d0:d1]]
        vals = [mem["v"], vw[:, :, d0:d1]]
        vis = [mem["ok"][:, :, None, :].expand(B, H, b - a, -1), dense_vis.expand(B, H, b - a, d1 - d0)]
        if sinks is not None:
            sv = sinks["sink_ok"] & (sinks["sink_pos"] < base[:, None])
            keys.insert(0, sinks["sink_k"])
            vals.insert(0, sinks["sink_v"])
            vis.insert(0, sv[:, None, None, :].expand(B, H, b - a, sv.shape[1]))
        outs.append(attend(qr[:, :, a - seen : b - seen], torch.cat(keys, 2).to(qr.dtype),
                           torch.cat(vals, 2).to(qr.dtype), torch.cat(vis, 3), scale, softcap,
                           null(rec) if null is not None else None))  # fmt: skip
    keep = window + chunk
    mem = {name: _grow(t, n) for name, t in mem.items()}  # the cache holds all n slots
    # ``mem_real`` (real tokens so far) and ``mem_pad`` (the first real token's position) give the one-token decode
    # step its positions on the device (``decode_position``); ``mem_start`` is the same start + 1 (0: none yet).
    real = (aux["mem_real"] if "mem_real" in aux else torch.zeros(B, dtype=torch.long, device=dev))
    real = real + (valid.long().sum(1) if valid is not None else T)
    new_aux = {f"mem_{name}": t for name, t in mem.items()} | {
        "win_fk": _align(fw, keep).clone(), "mem_start": start + 1, "mem_real": real,
        "mem_pad": torch.tensor(pad, device=dev)}
    rec = torch.cat(recs, 1) if recs[0] is not None else None
    return torch.cat(outs, 2), rec, state, (kw, vw, vb), new_aux


def decodes_on_device(layer: MixerCacheLayer | None, T: int, valid: Tensor | None) -> bool:
    """Whether this call is one real token per row over a static cache that a prefill filled: then
    ``memory_decode_step`` runs it with fixed shapes and no host synchronisation (capturable in a CUDA graph)."""
    return (layer is not None and layer.static and T == 1 and valid is None and layer.keys is not None
            and "mem_real" in layer.aux)  # fmt: skip


def decode_position(layer: MixerCacheLayer) -> Tensor:
    """``[B]`` the absolute position of each row's next token, on the device (left padding + real tokens so far)."""
    return layer.aux["mem_pad"] + layer.aux["mem_real"]


def memory_decode_step(
    qr: Tensor,
    kr: Tensor,
    vt: Tensor,
    fk: Tensor,
    valid: None,
    layer: MixerCacheLayer,
    window: int,
    chunk: int,
    n: int,
    scale: float,
    softcap: float | None,
    sinks: dict[str, Tensor] | None,
    state: State | None,
    recur: Callable[[int, int, State | None], tuple[Tensor | None, State]],
    null: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None, State, tuple[Tensor, Tensor, Tensor | None], dict[str, Tensor]]:
    """``memory_branch`` for one real token per row over a static cache, with shapes fixed and every decision on
    the device: capturable in a CUDA graph, and the same pairs, keys and state as ``memory_branch`` decoding.

    The cached window holds exactly ``W + C`` slots (the oldest may be invalid). The token at real position ``r``
    (``mem_real``) consolidates iff ``r >= W + C`` and ``r - W`` is a multiple of ``C``, and the block it consolidates
    is then the window's first ``C`` slots; consolidation is computed for every row and kept where it is due. All
    ``n`` memory slots are attended under their ``ok`` mask, where ``memory_branch`` reads only the fillable ones
    (the masked ones weigh exactly zero). Arguments and returns are ``memory_branch``'s, with ``T = 1``.
    """
    B, Hq, _, D = qr.shape
    H, K, Dv = kr.shape[1], fk.shape[-1], vt.shape[-1]
    dev = qr.device
    aux = layer.aux
    Wk = layer.keys.shape[2]
    real, pad = aux["mem_real"], aux["mem_pad"]
    p = pad + real  # [B] absolute position of this token
    kw, vw = torch.cat([layer.keys, kr], 2), torch.cat([layer.values, vt], 2)
    fw = torch.cat([_align(aux["win_fk"], Wk), fk.float()], 2)
    ok_buf = torch.cat([layer.valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)  # [B, Wk + 1]
    pos = p[:, None] - Wk + torch.arange(Wk + 1, device=dev)  # absolute position of each buffer slot
    cand_ok = ok_buf
    if sinks is not None:
        is_sink = ((sinks["sink_pos"][:, :, None] == pos[:, None, :]) & sinks["sink_ok"][:, :, None]).any(1)
        cand_ok = ok_buf & ~is_sink
    mem = {name: aux[f"mem_{name}"] for name in ("k", "v", "fk", "ok")}
    cut = ((real >= window + chunk) & ((real - window) % chunk == 0)).view(B, 1, 1)
    # Computed for every row and kept where due; on the CPU (never captured, syncs are free) only when due.
    if dev.type != "cpu" or torch.compiler.is_compiling() or bool(cut.any()):
        cand = {"k": kw[:, :, :chunk], "v": vw[:, :, :chunk], "fk": fw[:, :, :chunk],
                "ok": cand_ok[:, None, :chunk].expand(B, H, chunk)}  # fmt: skip
        st = state[0][..., :Dv] if state is not None else kr.new_zeros(B, H, K, Dv, dtype=torch.float32)
        new = consolidate(mem, cand, st, n)
        # Empty slots zeroed, as ``memory_branch`` leaves them: the cache then holds the same tensors either way.
        new = {name: (t if name == "ok" else t.masked_fill(~new["ok"][..., None], 0)) for name, t in new.items()}
        mem = {name: torch.where(cut if t.dim() == 3 else cut[..., None], t, mem[name]) for name, t in new.items()}
    rec, state = recur(0, 1, state)
    # Dense keys from the oldest unconsolidated block: real position C * floor((r - W) / C), or the first token.
    base = pad + torch.where(real >= window, torch.div(real - window, chunk, rounding_mode="floor") * chunk, 0)
    dense = (pos >= base[:, None]) & ok_buf
    dense[:, -1] = True  # a query always sees itself
    keys, vals = [mem["k"], kw], [mem["v"], vw]
    vis = [mem["ok"][:, :, None, :], dense[:, None, None, :].expand(B, H, 1, Wk + 1)]
    if sinks is not None:
        sv = sinks["sink_ok"] & (sinks["sink_pos"] < base[:, None])
        keys.insert(0, sinks["sink_k"])
        vals.insert(0, sinks["sink_v"])
        vis.insert(0, sv[:, None, None, :].expand(B, H, 1, sv.shape[1]))
    out = attend(qr, torch.cat(keys, 2).to(qr.dtype), torch.cat(vals, 2).to(qr.dtype), torch.cat(vis, 3), scale,
                 softcap, null(rec) if null is not None else None)  # fmt: skip
    new_aux = {f"mem_{name}": t for name, t in mem.items()} | {"win_fk": fw[:, :, 1:], "mem_real": real + 1,
                                                               "mem_pad": pad, "mem_start": aux["mem_start"]}  # fmt: skip
    return out, rec, state, (kw, vw, ok_buf), new_aux


def _align(t: Tensor, m: int) -> Tensor:
    """``t`` ``[B, H, L, ...]`` right-aligned to ``m`` slots: its last ``m``, or zeros prepended (``win_fk`` has one
    row per slot of the cached window, whose static form always holds ``W + C`` slots, the unwritten ones invalid)."""
    L = t.shape[2]
    if L >= m:
        return t[:, :, L - m :]
    return torch.cat([t.new_zeros(*t.shape[:2], m - L, *t.shape[3:]), t], dim=2)


def _grow(t: Tensor, m: int) -> Tensor:
    """``t`` ``[B, H, M, ...]`` with empty slots (zeros, ``ok`` False) appended up to ``m``."""
    if t.shape[2] >= m:
        return t
    return torch.cat([t, t.new_zeros(*t.shape[:2], m - t.shape[2], *t.shape[3:])], dim=2)
