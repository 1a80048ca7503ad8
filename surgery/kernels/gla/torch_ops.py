"""Pure-PyTorch forms of gated linear attention: a chunked parallel form and a token loop for decoding.

Both compute exactly the recurrence of ``naive.py`` (read it for the semantics); they are the CPU path (training
included, through plain autograd) and the fallback wherever the Triton kernels do not apply.

Chunked form, per key/value head and chunk of C rows, writing ``e^{g[a:b]}`` for the decay of the gates of rows
a..b-1 (a product of per-dimension factors <= 1, since gates are <= 0):

    o_t    = scale * [ (q_t * e^{gk[0:t+1]}) @ S  *  e^{gv[0:t+1]}
                       + sum_{s <= t} (q_t * e^{gk[s+1:t+1]}) . k_s  *  e^{gv[s+1:t+1]} * v_s ]
    S_next = e^{gk[0:C]}^T * S * e^{gv[0:C]} + (k * e^{gk[s+1:C]})^T @ (v * e^{gv[s+1:C]})

Every exponential that is materialised has an argument <= 0, so gates of -500 per step underflow to 0 and never
overflow: ``e^{+cumsum}`` is never formed. The intra-chunk sum is split by sub-chunks of 8 rows: between
sub-chunks the decay factors through the first row r of t's sub-chunk, ``e^{g[s+1:t+1]} = e^{g[r+1:t+1]} *
e^{g[s+1:r+1]}``, which turns it into a matmul; inside a sub-chunk the ``[8, 8, D]`` decay block is formed
elementwise, its upper triangle masked after ``exp`` (the argument there is an empty sum, 0). Every range is summed
on its own (see ``_Decays``).

Chunks of 32 rows and sub-chunks of 8 are the fastest on the CPU (B = 4, T = 512, 9/3 heads of 64, per-dimension
key gates: forward 27 ms and forward + backward 80 ms, against 59 and 173 ms with 64 and 16): the elementwise
decay blocks, which are memory-bound, shrink with the sub-chunk, and the matmuls lose little at 32 rows.

Variable-length segments and batch rows are handled alike: each sequence is padded to whole chunks (pad tokens
have zero gates, keys and values, so they leave the state untouched) and the chunks are packed together; only the
chunk-to-chunk state scan is sequential, over the longest sequence's chunk count.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

SUB = 8  # sub-chunk rows: the elementwise decay block is [SUB, SUB, K] per sub-chunk


def check_gla_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None,
    gv: Tensor | None,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
) -> int:
    """Check the shapes of a GLA call (no device synchronisation) and return N, the number of sequences.

    Raises:
        ValueError: naming the argument whose shape or dtype is wrong.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating [B, T, H, D] tensor, got {x.dtype} {tuple(x.shape)}")
    B, T, Hq, K = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != K:
        raise ValueError(f"k must be [B, T, Hkv, K] = [{B}, {T}, Hkv, {K}] like q, got {tuple(k.shape)}")
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, T, Hkv, V] with [B, T, Hkv] = {tuple(k.shape[:3])}, got {tuple(v.shape)}")
    if gk is not None and gk.shape != k.shape:
        raise ValueError(f"gk must have k's shape {tuple(k.shape)}, got {tuple(gk.shape)}")
    if gv is not None and gv.shape != v.shape:
        raise ValueError(f"gv must have v's shape {tuple(v.shape)}, got {tuple(gv.shape)}")
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(
                "cu_seqlens must be an integer [N + 1] tensor with N >= 1, "
                f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (segments are packed along T), got B = {B}")
        N = cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, Hkv, K, v.shape[3]):
        want = (N, Hkv, K, v.shape[3])
        raise ValueError(f"initial_state must be [N, Hkv, K, V] = {want}, got {tuple(initial_state.shape)}")
    return N


def _bounds(B: int, T: int, cu_seqlens: Tensor | None) -> list[tuple[int, int]]:
    """Start and end of every sequence in the flattened ``[B * T]`` time axis."""
    if cu_seqlens is None:
        return [(b * T, (b + 1) * T) for b in range(B)]
    cs = cu_seqlens.tolist()
    if cs[0] != 0 or cs[-1] != T or any(a > b for a, b in zip(cs, cs[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T} without decreasing, got {cs}")
    return list(zip(cs[:-1], cs[1:]))


def _pack_index(
    bounds: list[tuple[int, int]], padded: list[int], total: int, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """Gather indices that lay sequence n out in ``padded[n]`` rows, one after another.

    Returns ``idx`` [sum(padded)] into the flattened time axis plus one zero row at ``total`` (the padding), and
    ``inv`` [total], the packed row of every real token (every token belongs to a sequence: bounds cover it); both
    None when no sequence needs padding rows (the packed layout is the flat one, and packing is a reshape).
    """
    if all(end - start == rows for (start, end), rows in zip(bounds, padded)):
        return None, None
    parts = []
    for (start, end), rows in zip(bounds, padded):
        parts.append(torch.arange(start, end))
        parts.append(torch.full((rows - (end - start),), total))
    idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    inv = torch.empty(total, dtype=torch.long)
    real = idx < total
    inv[idx[real]] = torch.arange(idx.numel())[real]
    return idx.to(device), inv.to(device)


def _pack(x: Tensor, idx: Tensor | None, acc: torch.dtype) -> Tensor:
    """``[B, T, ...]`` -> ``[len(idx), ...]`` in ``acc``, with zeros where ``idx`` points past the end
    (``[B * T, ...]`` when ``idx`` is None)."""
    flat = x.reshape(-1, *x.shape[2:]).to(acc)
    return flat if idx is None else torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])[idx]


class _Decays(NamedTuple):
    """``e^{sum of g over a range}`` for the ranges the chunked form needs, per chunk ``[n, h, C, D]``.

    Each range is summed on its own (a running sum from its first gate, or a 0/1 matrix that picks its gates)
    rather than as a difference of prefix sums: in fp32 the difference ``b_t - b_s`` loses every small gate that
    follows a large one (after a -500 step the prefix sum's ulp is ~1e-4), while a sum of same-sign gates is
    accurate in any order.
    """

    start: Tensor  # [n, h, C, D]: gates of rows 0..t (state entering the chunk -> row t)
    end: Tensor  # [n, h, C, D]: gates of rows s+1..C-1 (row s -> chunk end)
    total: Tensor  # [n, h, D]: all gates of the chunk
    row: Tensor  # [n, h, C, D]: gates after the first row of t's sub-chunk, up to t
    col: Tensor  # [n, h, I, C, D]: gates of rows s+1..start of sub-chunk i; 0 unless s precedes sub-chunk i
    diag: Tensor  # [n, h, I, t, D, s] (sub x D x sub): gates of rows s+1..t inside sub-chunk i; 0 unless s <= t


def _after(g: Tensor, dim: int) -> Tensor:
    """Per row s, the sum of the gates of rows s+1.. to the end of ``dim``, summed backwards from that end (0 at the
    last row): the range sums that decay a write to the end of its chunk or block."""
    tail = g.narrow(dim, 1, g.shape[dim] - 1).flip(dim).cumsum(dim).flip(dim)
    return torch.cat([tail, torch.zeros_like(g.narrow(dim, 0, 1))], dim)


def _decays(g: Tensor, sub: int) -> _Decays:
    """The decay factors of one side from its per-step gates ``g`` ``[n, h, C, D]`` (<= 0, so all factors <= 1).

    Every range is summed directly, by a running sum (``cumsum`` forward or backward from its first gate) or by a
    0/1 matrix that picks its gates, never as a difference of two sums.
    """
    n, h, C, D = g.shape
    I = C // sub
    start = g.cumsum(2)  # rows 0..t
    end = _after(g, 2)  # rows s+1..C-1
    gs = g.reshape(n, h, I, sub, D)
    row = torch.cat([g.new_zeros(n, h, I, 1, D), gs[:, :, :, 1:].cumsum(3)], 3)  # rows first+1..t
    # The two blocks are sums of the gates over many ranges at once: a matmul with a 0/1 matrix that picks each
    # range's rows (a direct sum, like the running sums, and faster on the CPU than masking and cumsum-ing a copy of
    # the gates per range: a SmolLM2-shaped layer's forward, B = 4, T = 512, 46 -> 39 ms in one interleaved run).
    # An empty range sums to 0, so its factor is e^0 = 1, zeroed by the mask after exp.
    # col[i, s]: rows s+1..first row of sub-chunk i; 0 unless s precedes it.
    pos = torch.arange(C, device=g.device)
    first = pos[::sub]  # [I]
    u, i, s = pos[:, None, None], first[None, :, None], pos[None, None, :]
    pick = ((s < u) & (u <= i)).to(g.dtype).reshape(C, I * C)  # [u, (i, s)]
    col = (g.transpose(-1, -2) @ pick).view(n, h, D, I, C).exp() * (pos[None, :] < first[:, None])
    col = col.permute(0, 1, 3, 4, 2)  # [n, h, I, C, D]
    # diag[i, t, :, s]: rows s+1..t of sub-chunk i; 0 unless s <= t.
    loc = torch.arange(sub, device=g.device)
    u, t, s = loc[:, None, None], loc[None, :, None], loc[None, None, :]
    pick = ((s < u) & (u <= t)).to(g.dtype).reshape(sub, sub * sub)  # [u, (t, s)]
    diag = (gs.transpose(-1, -2) @ pick).view(n, h, I, D, sub, sub).exp() * (loc[None, :] <= loc[:, None])
    diag = diag.permute(0, 1, 2, 4, 3, 5)  # [n, h, I, t, D, s]: the matmul with q runs over [D, s] blocks
    start, end, row = start.exp(), end.exp(), row.reshape(n, h, C, D).exp()
    return _Decays(start, end, start[:, :, -1], row, col, diag)


def _intra(q: Tensor, k: Tensor, v: Tensor, dk: _Decays | None, dv: _Decays | None, sub: int) -> Tensor:
    """Intra-chunk attention: q ``[n, h, g, C, K]``, k ``[n, h, C, K]``, v ``[n, h, C, V]`` -> ``[n, h, g, C, V]``.

    Rows of sub-chunk i see earlier sub-chunks through one matmul, ``e^{g[s+1:t+1]} = row_t * col_{i,s}``
    (both factors <= 1), and their own sub-chunk through the elementwise ``diag`` block.
    """
    n, h, g, C, K = q.shape
    V = v.shape[-1]
    I = C // sub
    qs, ks, vs = q.reshape(n, h, g, I, sub, K), k.reshape(n, h, I, sub, K), v.reshape(n, h, I, sub, V)
    if dk is None:
        pos = torch.arange(C, device=q.device)
        before = (pos[None, :] < pos[::sub, None]).to(q.dtype)[:, None, :]  # [I, 1, C]: s precedes sub-chunk i
        a_off = torch.einsum("nhgitk,nhsk->nhgits", qs, k) * before
        a_diag = torch.einsum("nhgitk,nhisk->nhgits", qs, ks).tril()
    else:
        q_dec = qs * dk.row.reshape(n, h, I, sub, K).unsqueeze(2)
        a_off = torch.einsum("nhgitk,nhisk->nhgits", q_dec, k.unsqueeze(2) * dk.col)
        a_diag = torch.einsum("nhgitk,nhitks->nhgits", qs, dk.diag * ks.transpose(-1, -2).unsqueeze(3))
    # a_off: [n, h, g, I, sub, C] (zero from the row's own sub-chunk on); a_diag: [n, h, g, I, sub, sub].
    if dv is None:
        o = torch.einsum("nhgits,nhsv->nhgitv", a_off, v) + torch.einsum("nhgits,nhisv->nhgitv", a_diag, vs)
    else:
        o = torch.einsum("nhgits,nhisv->nhgitv", a_off, v.unsqueeze(2) * dv.col)
        o = o * dv.row.reshape(n, h, I, sub, V).unsqueeze(2)
        o = o + torch.einsum("nhgits,nhitvs->nhgitv", a_diag, dv.diag * vs.transpose(-1, -2).unsqueeze(3))
    return o.reshape(n, h, g, C, V)


def torch_chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[Tensor, Tensor | None]:
    """Chunked gated linear attention in PyTorch (differentiable by autograd); matches ``naive_recurrent_gla``.

    Args:
        q: ``[B, T, Hq, K]`` queries.
        k: ``[B, T, Hkv, K]`` keys; ``Hq % Hkv == 0`` (query head i reads state i // (Hq // Hkv)).
        v: ``[B, T, Hkv, V]`` values.
        gk: ``[B, T, Hkv, K]`` log decay (<= 0) on the key side, or None.
        gv: ``[B, T, Hkv, V]`` log decay (<= 0) on the value side, or None.
        scale: multiplies the output.
        initial_state: ``[N, Hkv, K, V]``; N = B, or the number of segments with ``cu_seqlens``.
        output_final_state: return the state after each sequence/segment.
        cu_seqlens: ``[N + 1]`` segment boundaries along T (B must be 1); empty segments are allowed.
        chunk_size: rows per chunk (sequences shorter than it use a smaller power of two, at least ``SUB``).

    Returns:
        ``o`` ``[B, T, Hq, V]`` in v's dtype, and the final state ``[N, Hkv, K, V]`` (fp32, fp64 for fp64
        inputs) or None. Accumulation is in fp32 (fp64 for fp64 inputs).
    """
    N = check_gla_inputs(q, k, v, gk, gv, initial_state, cu_seqlens)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, T, Hq, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    G = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    bounds = _bounds(B, T, cu_seqlens)
    longest = max(end - start for start, end in bounds)
    C = min(chunk_size, max(SUB, 1 << max(longest - 1, 0).bit_length()))
    sub = SUB if C % SUB == 0 else C
    counts = [-(-(end - start) // C) for start, end in bounds]  # chunks per sequence
    idx, inv = _pack_index(bounds, [c * C for c in counts], B * T, q.device)
    n = sum(counts)

    def chunks(x: Tensor) -> Tensor:  # [B, T, H, D] -> [n, H, C, D]
        return _pack(x, idx, acc).view(n, C, *x.shape[2:]).transpose(1, 2)

    qc = (_pack(q, idx, acc) * scale).view(n, C, Hkv, G, K).permute(0, 2, 3, 1, 4)  # [n, h, g, C, K]
    kc, vc = chunks(k), chunks(v)
    dk = _decays(chunks(gk), sub) if gk is not None else None
    dv = _decays(chunks(gv), sub) if gv is not None else None

    o = _intra(qc, kc, vc, dk, dv, sub)
    # What each chunk adds to the state, decayed to the chunk's end (pad rows have zero gates: no decay).
    k_end, v_end, decay = kc, vc, None
    if dk is not None:
        k_end = kc * dk.end
        decay = dk.total.unsqueeze(-1)  # [n, h, K, 1]
        qc = qc * dk.start.unsqueeze(2)
    if dv is not None:
        v_end = vc * dv.end
        decay = dv.total.unsqueeze(-2) if decay is None else decay * dv.total.unsqueeze(-2)  # [n, h, K|1, V]
    update = k_end.transpose(-1, -2) @ v_end  # [n, h, K, V]

    # Sequential scan over chunk positions, all sequences at once. Sequences with fewer chunks point at an
    # extra identity chunk (decay 1, update 0), so their state stops changing.
    P = max(counts)
    table = torch.full((N, P), n, dtype=torch.long)
    first = 0
    for s, c in enumerate(counts):
        table[s, :c] = torch.arange(first, first + c)
        first += c
    table = table.to(q.device)
    update = torch.cat([update, update.new_zeros(1, Hkv, K, V)])
    if decay is not None:
        decay = torch.cat([decay, decay.new_ones(1, *decay.shape[1:])])
    S = q.new_zeros(N, Hkv, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    before = []
    for p in range(P):
        before.append(S)
        j = table[:, p]
        S = (S * decay[j] if decay is not None else S) + update[j]
    if n:
        seq = torch.repeat_interleave(torch.arange(N), torch.tensor(counts)).to(q.device)
        pos = torch.cat([torch.arange(c) for c in counts]).to(q.device)
        states = torch.stack(before)[pos, seq]  # [n, h, K, V]: state entering each chunk
        inter = qc @ states.unsqueeze(2)  # [n, h, g, C, V]
        o = o + (inter * dv.start.unsqueeze(2) if dv is not None else inter)
    o = o.permute(0, 3, 1, 2, 4).reshape(n * C, Hq, V)
    o = o if inv is None else o[inv]
    return o.view(B, T, Hq, V).to(v.dtype), (S if output_final_state else None)


def torch_gla_state(
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """The final state of gated linear attention without its outputs: what a caller that only reads the state
    needs (the retrieval memory scores pairs with it while the recurrent branch's output is unused).

    Per chunk of C rows the state takes ``e^{total}`` and ``(k * e^{gk[s+1:C]})^T @ (v * e^{gv[s+1:C]})``, the
    update of :func:`torch_chunk_gla`, with no query, no intra-chunk block and no sub-chunk decays: about a third
    of its work. Pad rows (T rounded up to whole chunks) have zero gates, keys and values.

    Args:
        k: ``[B, T, Hkv, K]``; v: ``[B, T, Hkv, V]``; gk, gv: their log decays (<= 0) or None.
        initial_state: ``[B, Hkv, K, V]`` or None.

    Returns:
        ``[B, Hkv, K, V]`` fp32 (fp64 for fp64 inputs).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    S = k.new_zeros(B, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    C = min(chunk_size, max(1, T))
    n = -(-T // C)

    def chunks(x: Tensor) -> Tensor:  # [B, T, H, D] -> [B, n, H, C, D], zero rows appended
        x = torch.nn.functional.pad(x.to(acc), (0, 0, 0, 0, 0, n * C - T))
        return x.view(B, n, C, H, x.shape[-1]).transpose(2, 3)

    def to_end(g: Tensor) -> tuple[Tensor, Tensor]:  # e^{rows s+1..C-1} [B, n, H, C, D], e^{all rows} [B, n, H, D]
        return _after(g, 3).exp(), g.sum(3).exp()

    kc, vc = chunks(k), chunks(v)
    decay = None
    if gk is not None:
        end, total = to_end(chunks(gk))
        kc, decay = kc * end, total.unsqueeze(-1)
    if gv is not None:
        end, total = to_end(chunks(gv))
        vc = vc * end
        decay = total.unsqueeze(-2) if decay is None else decay * total.unsqueeze(-2)
    update = kc.transpose(-1, -2) @ vc  # [B, n, H, K, V]
    for i in range(n):
        S = (S * decay[:, i] if decay is not None else S) + update[:, i]
    return S


def torch_recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention one token at a time, all sequences together; for decoding (T small, often 1).

    Same arguments, shapes and results as :func:`torch_chunk_gla` (without ``chunk_size``). Each step is
    ``S = S * e^{gk}^T * e^{gv} + k^T v; o = scale * q @ S`` with the state kept in fp32 (fp64 for fp64 inputs).
    With ``cu_seqlens`` the segments are padded to the longest one (pad tokens leave the state unchanged).
    """
    N = check_gla_inputs(q, k, v, gk, gv, initial_state, cu_seqlens)
    B, T, Hq, K = q.shape
    Hkv, V = v.shape[2], v.shape[3]
    G = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cu_seqlens is None:
        L, inv = T, None

        def rows(x: Tensor) -> Tensor:  # [B, T, H, D] -> [N, L, H, D]
            return x.to(acc)
    else:
        bounds = _bounds(B, T, cu_seqlens)
        L = max(end - start for start, end in bounds)
        idx, inv = _pack_index(bounds, [L] * N, T, q.device)

        def rows(x: Tensor) -> Tensor:
            return _pack(x, idx, acc).view(N, L, *x.shape[2:])

    qr = rows(q).reshape(N, L, Hkv, G, K) * scale
    kr, vr = rows(k), rows(v)
    ek = rows(gk).exp().unsqueeze(-1) if gk is not None else None  # [N, L, h, K, 1]
    ev = rows(gv).exp().unsqueeze(-2) if gv is not None else None  # [N, L, h, 1, V]
    S = q.new_zeros(N, Hkv, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    outs = []
    for t in range(L):
        if ek is not None:
            S = S * ek[:, t]
        if ev is not None:
            S = S * ev[:, t]
        S = torch.addcmul(S, kr[:, t].unsqueeze(-1), vr[:, t].unsqueeze(-2))
        outs.append(qr[:, t] @ S)  # [N, h, g, K] @ [N, h, K, V]
    o = torch.stack(outs, 1) if outs else qr.new_zeros(N, 0, Hkv, G, V)
    o = o.reshape(N * L, Hq, V)
    if inv is not None:
        o = o[inv]
    return o.view(B, T, Hq, V).to(v.dtype), (S if output_final_state else None)
