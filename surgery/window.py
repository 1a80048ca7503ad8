"""Sliding-window softmax attention over a band (never a T x T score matrix): the public helper of window mixers.

A query at position p sees the keys at positions p - window ... p: ``window`` previous tokens and itself, i.e.
``window + 1`` keys (Liger's FlashAttention call with ``window_size=(64, 64)`` and causal masking, liger.md
section 3). Queries are processed in blocks of ``block`` rows; block b needs only the keys from
``b * block - window`` to ``(b + 1) * block - 1``, so each block scores ``block x (block + window)`` entries and
the whole call ``T x (block + window)``: linear in T.

Attention sinks (``sinks: N``, StreamingLLM; the training-free "window of 64 + 4 sinks" baseline of
research/recall.md section 1): the first N real tokens of each sequence stay visible to every later query. They are
passed as extra keys with a per-query visibility mask (visible only once outside the band, so no key counts twice)
and kept in the cache at constant size (``MixerCacheLayer.aux``); with left padding they are the first N *real*
tokens of each row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from surgery.cache import MixerCacheLayer
from surgery.mixer import MixContext, apply_rope


def band_mask(block: int, window: int, device: torch.device | None = None) -> Tensor:
    """``[block, block + window]`` bool: local query r sees local key c iff ``r <= c <= r + window``.

    Local key c of block b is absolute key ``b * block - window + c``; local query r is ``b * block + r``.
    """
    r = torch.arange(block, device=device)[:, None]
    c = torch.arange(block + window, device=device)[None, :]
    return (c >= r) & (c <= r + window)


def _sink_column(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, sink_logits: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Keys, values and an additive mask with one more key per head whose logit is that head's sink logit.

    The extra key is zero with a zero value, so it adds ``exp(sink)`` to the softmax denominator and nothing to the
    output: the learned sinks of GPT-OSS-style layers, inside the window softmax.

    Args:
        q: ``[N, Hq, Q, D]``; k, v: ``[N, Hkv, L, D]``; mask: bool ``[N, 1, Q, L]`` (True: visible) or None;
        sink_logits: ``[Hq]``.

    Returns:
        k, v ``[N, Hkv, L + 1, D]`` and a float mask ``[N, Hq, Q, L + 1]``.
    """
    N, Hq, Q, _ = q.shape
    L = k.shape[2]
    bias = q.new_zeros(N, 1, Q, L)
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf"))
    col = sink_logits.to(q.dtype).view(1, Hq, 1, 1).expand(N, Hq, Q, 1)
    bias = torch.cat([bias.expand(N, Hq, Q, L), col], dim=-1)
    k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[3])], dim=2)
    v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
    return k, v, bias


def null_column(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, logits: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Keys, values and an additive mask with one more key per query, whose logit is ``logits`` and whose value
    marks it: an extra value column that is 1 for it and 0 for every real key.

    The output's last column is then the softmax weight of that key, and the others the real keys' weighted values
    over the shared denominator: how a recurrent branch joins the softmax under one normalizer (``combine:
    shared`` of Liger Attention) without the softmax's log-sum-exp.

    Args:
        q: ``[N, Hq, Q, D]``; k ``[N, Hkv, L, D]``, v ``[N, Hkv, L, Dv]``; mask: bool ``[N, 1 or Hq, Q, L]`` or None.
        logits: ``[N, Hq, Q]`` the extra key's logit for each query.

    Returns:
        k ``[N, Hkv, L + 1, D]``, v ``[N, Hkv, L + 1, Dv + 1]`` and a float mask ``[N, Hq, Q, L + 1]``.
    """
    N, Hq, Q, _ = q.shape
    L = k.shape[2]
    bias = q.new_zeros(N, Hq, Q, L)
    if mask is not None:
        bias = bias.masked_fill(~mask.expand(N, Hq, Q, L), float("-inf"))
    bias = torch.cat([bias, logits.to(q.dtype)[..., None]], dim=-1)
    k = torch.cat([k, k.new_zeros(*k.shape[:2], 1, k.shape[3])], dim=2)
    v = F.pad(v, (0, 1, 0, 1))
    v[:, :, -1, -1] = 1
    return k, v, bias


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    scale: float,
    key_valid: Tensor | None = None,
    softcap: float | None = None,
    block: int = 64,
    extra: tuple[Tensor, Tensor, Tensor] | None = None,
    sink_logits: Tensor | None = None,
    null_logits: Tensor | None = None,
) -> Tensor:
    """Causal softmax attention restricted to the last ``window + 1`` keys (plus extra keys), GQA-native.

    The T queries are the last T positions of the S keys (S - T earlier keys come from a cache).

    Args:
        q: ``[B, Hq, T, D]`` post-RoPE queries.
        k: ``[B, Hkv, S, D]`` post-RoPE keys, S >= T; ``Hq % Hkv == 0``.
        v: ``[B, Hkv, S, Dv]``.
        window: previous tokens each query sees besides itself.
        scale: softmax scale (the pretrained layer's).
        key_valid: ``[B, S]`` bool, False for padding keys; None when all are real. A query always sees itself,
            so a padding query has a finite (and ignored) output.
        softcap: Gemma-2-style logit soft-capping ``softcap * tanh(s / softcap)``, or None.
        block: query rows per block (memory is ``O(T * (block + window))``).
        extra: ``(keys [B, Hkv, M, D], values [B, Hkv, M, Dv], visible [B, T, M] bool)``: keys outside the band
            (sinks, a retrieval memory) that query t sees where ``visible[:, t]`` is True; None: none.
        sink_logits: ``[Hq]`` learned per-head logits added to every softmax denominator (GPT-OSS-style sinks,
            not the ``sinks`` tokens above), or None.
        null_logits: ``[B, Hq, T]`` the logit of one more key per query whose value is a marker (``null_column``):
            the output gains a last column, that key's softmax weight; or None.

    Returns:
        ``[B, Hq, T, Dv]`` (``Dv + 1`` with ``null_logits``).
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if (sink_logits is not None or null_logits is not None) and softcap is not None:
        raise ValueError("sliding_window_attention: sink or null logits with soft-capping are not supported")
    if sink_logits is not None and null_logits is not None:
        raise ValueError("sliding_window_attention: sink logits and null logits together are not supported")
    if T == 1 and S <= window + 1 and softcap is None:
        # Decoding from a cache that holds at most `window` past keys: every key is in the window, so the band,
        # the gather and the block padding are not needed (they cost more launches than the attention itself).
        mask = None if key_valid is None else key_valid.to(torch.bool)[:, None, None, :].clone()
        if mask is not None:
            mask[..., -1] = True  # the query itself, as in the general path
        if extra is not None:
            ek, ev, eok = extra
            if mask is None:
                mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=q.device)
            mask = torch.cat([eok[:, None].to(torch.bool), mask], dim=-1)
            k, v = torch.cat([ek.to(k.dtype), k], dim=2), torch.cat([ev.to(v.dtype), v], dim=2)
        if sink_logits is not None:
            k, v, mask = _sink_column(q, k, v, mask, sink_logits)
        if null_logits is not None:
            k, v, mask = null_column(q, k, v, mask, null_logits)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    off = S - T  # absolute position of query 0
    bq = max(1, min(block, T))
    nb = -(-T // bq)
    L = bq + window
    device = q.device
    # Key indices of each block: [nb, L], from b*bq + off - window; out-of-range ones are masked below.
    idx = torch.arange(nb, device=device)[:, None] * bq + off - window + torch.arange(L, device=device)[None, :]
    in_range = (idx >= 0) & (idx < S)
    idx_c = idx.clamp(0, S - 1)
    kb = k[:, :, idx_c].permute(0, 2, 1, 3, 4).reshape(B * nb, Hkv, L, D)  # [B*nb, Hkv, L, D]
    vb = v[:, :, idx_c].permute(0, 2, 1, 3, 4).reshape(B * nb, Hkv, L, v.shape[-1])
    ok = in_range.expand(B, nb, L)
    if key_valid is not None:
        ok = ok & key_valid.to(torch.bool)[:, idx_c]
    band = band_mask(bq, window, device)
    itself = torch.eye(bq, L, dtype=torch.bool, device=device).roll(window, dims=1)  # c == r + window
    mask = (band & ok[:, :, None, :]) | itself  # [B, nb, bq, L]
    if extra is not None:
        ek, ev, eok = extra
        M = ek.shape[2]
        eok = F.pad(eok.to(torch.bool), (0, 0, 0, nb * bq - T)).view(B, nb, bq, M)
        mask = torch.cat([eok, mask], dim=-1)
        kb = torch.cat([ek.to(kb.dtype).repeat_interleave(nb, dim=0), kb], dim=2)
        vb = torch.cat([ev.to(vb.dtype).repeat_interleave(nb, dim=0), vb], dim=2)
        L = L + M
    mask = mask.reshape(B * nb, 1, bq, L)
    qb = F.pad(q, (0, 0, 0, nb * bq - T))  # [B, Hq, nb*bq, D]
    qb = qb.view(B, Hq, nb, bq, D).transpose(1, 2).reshape(B * nb, Hq, bq, D)
    if sink_logits is not None:
        kb, vb, mask = _sink_column(qb, kb, vb, mask, sink_logits)
    if null_logits is not None:
        nl = F.pad(null_logits, (0, nb * bq - T)).view(B, Hq, nb, bq).transpose(1, 2).reshape(B * nb, Hq, bq)
        kb, vb, mask = null_column(qb, kb, vb, mask, nl)
    if softcap is None:
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    else:
        G = Hq // Hkv
        s = torch.einsum("nhgqd,nhkd->nhgqk", qb.view(B * nb, Hkv, G, bq, D).float(), kb.float()) * scale
        s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)
        o = torch.einsum("nhgqk,nhkd->nhgqd", s, vb.float()).reshape(B * nb, Hq, bq, -1).to(q.dtype)
    o = o.view(B, nb, Hq, bq, -1).transpose(1, 2).reshape(B, Hq, nb * bq, -1)
    return o[:, :, :T]


def rope(q: Tensor, k: Tensor, ctx: MixContext) -> tuple[Tensor, Tensor]:
    """``[B, T, H, D]`` q and k -> ``[B, H, T, D]``, rotated as the mixer's layer rotates (``ctx.rotate``).

    A context built without a mixer (benchmarks, tests) rotates rotate-half when it carries ``(cos, sin)``.
    """
    if ctx.rotate is not None:
        return ctx.rotate(q, k, ctx.position_embeddings)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if ctx.position_embeddings is None:
        return q, k
    cos, sin = ctx.position_embeddings
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def update_sinks(
    layer_aux: dict[str, Tensor] | None,
    keys: Tensor,
    values: Tensor,
    valid: Tensor | None,
    seen: int | Tensor,
    n: int,
) -> dict[str, Tensor]:
    """The first ``n`` real tokens of each row so far: the cached sinks completed from this call's tokens.

    Args:
        layer_aux: the cache's ``aux`` (keys ``sink_k``/``sink_v`` ``[B, Hkv, n, D]``, ``sink_pos`` ``[B, n]``
            absolute positions, ``sink_ok`` ``[B, n]`` filled) or None (no cache, or nothing cached yet).
        keys, values: ``[B, Hkv, T, D]`` post-RoPE keys and values of this call; valid: ``[B, T]`` or None.
        seen: absolute position of this call's first token, or ``[B]`` per row (on the device: a captured decode
            step, which then runs without a host synchronisation).

    Returns:
        The new ``sink_k``, ``sink_v``, ``sink_pos``, ``sink_ok``.
    """
    B, H, T, D = keys.shape
    dev = keys.device
    if layer_aux and "sink_k" in layer_aux:
        sk, sv, spos, sok = (layer_aux[n_] for n_ in ("sink_k", "sink_v", "sink_pos", "sink_ok"))
    else:
        sk, sv = keys.new_zeros(B, H, n, D), values.new_zeros(B, H, n, values.shape[-1])
        spos, sok = torch.zeros(B, n, dtype=torch.long, device=dev), torch.zeros(B, n, dtype=torch.bool, device=dev)
    if isinstance(seen, int) and bool(sok.all()):  # every sink filled: nothing to do (a sync, so not when captured)
        return {"sink_k": sk, "sink_v": sv, "sink_pos": spos, "sink_ok": sok}
    real = valid.to(torch.bool) if valid is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
    rank = sok.sum(1, keepdim=True) + real.long().cumsum(1) - 1  # slot of each real token
    slot = torch.where(real & (rank < n), rank, torch.full_like(rank, n))  # n: a dump slot, dropped below
    pos = (seen if isinstance(seen, int) else seen[:, None]) + torch.arange(T, device=dev).expand(B, T)
    idx = slot[:, None, :, None]
    sk = torch.cat([sk, sk[:, :, :1]], 2).scatter(2, idx.expand(B, H, T, D), keys.to(sk.dtype))[:, :, :n]
    sv = torch.cat([sv, sv[:, :, :1]], 2).scatter(2, idx.expand(B, H, T, sv.shape[-1]), values.to(sv.dtype))[:, :, :n]
    spos = torch.cat([spos, spos[:, :1]], 1).scatter(1, slot, pos)[:, :n]
    sok = torch.cat([sok, sok[:, :1]], 1).scatter(1, slot, torch.ones_like(real))[:, :n]
    return {"sink_k": sk, "sink_v": sv, "sink_pos": spos, "sink_ok": sok}


def swa_branch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ctx: MixContext,
    layer: MixerCacheLayer | None,
    window: int,
    scale: float,
    softcap: float | None = None,
    sinks: int = 0,
    sink_logits: Tensor | None = None,
    null_logits: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor | None], dict[str, Tensor]]:
    """The pretrained softmax attention (RoPE, scale, GQA) restricted to a window, continuing a cached window.

    Args:
        q: ``[B, T, Hq, D]`` pre-RoPE queries (after the model's q norm).
        k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, Dv]``.
        ctx: the call's context (position embeddings, padding mask).
        layer: this layer's cache, or None.
        sinks: the first ``sinks`` real tokens of each row stay visible to every query (0: none).
        sink_logits: ``[Hq]`` the layer's learned sink logits (``Mixer.sink_logits``), or None.
        null_logits: ``[B, Hq, T]`` logits of a marker key per query (``sliding_window_attention``), or None.

    Returns:
        ``[B, T, Hq, Dv]`` (``Dv + 1`` with ``null_logits``), the ``(keys, values, valid)`` window to pass to ``layer.commit``, and the ``aux``
        tensors to commit (the sinks; empty without sinks).
    """
    qr, kr = rope(q, k, ctx)
    qr = ctx.scale_queries(qr)
    vt = v.transpose(1, 2)
    if layer is not None:
        kw, vw, valid = layer.window_with(kr, vt, ctx.padding_mask)
    else:
        kw, vw, valid = kr, vt, ctx.padding_mask
    aux: dict[str, Tensor] = {}
    extra = None
    if sinks > 0:
        seen = layer.seen if layer is not None else 0
        aux = update_sinks(layer.aux if layer is not None else None, kr, vt, ctx.padding_mask, seen, sinks)
        T = q.shape[1]
        qpos = seen + torch.arange(T, device=q.device)
        # Visible once the sink has left the band (inside it the band already shows it).
        visible = aux["sink_ok"][:, None, :] & (aux["sink_pos"][:, None, :] < (qpos - window)[None, :, None])
        extra = (aux["sink_k"], aux["sink_v"], visible)
    o = sliding_window_attention(qr, kw, vw, window, scale, key_valid=valid, softcap=softcap, extra=extra,
                                 sink_logits=sink_logits, null_logits=null_logits)
    return o.transpose(1, 2), (kw, vw, valid), aux
