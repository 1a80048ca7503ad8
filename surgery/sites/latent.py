"""Multi-head latent attention (MLA): q/k/v produced by the model's own low-rank projection sub-graph.

DeepSeek-V2/V3 and the families built on them (MiniCPM3, GLM-4-MoE-Lite, Youtu, LongCat-Flash, ...) have no
q/k/v projections to read. Per token ``x`` ``[C]`` and head ``h``::

    q_h       = q_b(q_a_norm(q_a(x)))_h          (or q_proj(x)_h without a query rank)   [nope | rope]
    c, k_pe   = kv_a(x)                           latent [rank] and one rotary key [rope] shared by all heads
    k_nope_h, v_h = kv_b(kv_a_norm(c))_h           [nope], [v_head_dim]
    k_h       = [k_nope_h | k_pe]

Variants, each read from the module's children and attributes: AXK2 fuses a per-channel output gate into the
query projection (``q_gate_proj`` maps ``[q_a_norm(q_a(x)) | q_a(x)]`` to ``[nope | rope | v]`` per head, the
gate applied as ``sigmoid`` in fp32 before ``o_proj``); Dots3 scales the normalised query latent
(``q_lora_scale``) and key/value latent (``kv_lora_scale``) and normalises ``k_pe`` before RoPE
(``k_rope_only_layernorm``); LongCat scales q and the key/value latent (``mla_scale_q_lora``/``mla_scale_kv_lora``).
The normalised query latent is also what a DSA indexer reads (``surgery.sites.key_selection``).

RoPE rotates only the trailing ``rope`` dims of q and k, in the family's convention (rotate-half, interleaved
pairs, or complex ``freqs_cis``): the site's ``Rotary`` of convention ``latent`` (``latent_rotary``), applied through
``Mixer.rotate`` like every other site's; the query/key head dim ``nope + rope`` differs from the value head dim. A site
of this layout names the sub-graph's children; mixers deep-copy them under the same names (so weight maps, LoRA
targets and saved tensors keep the model's names) and expand the latent into ordinary per-head q, k, v: every
mixer then runs unchanged, with as many key/value heads as query heads.

Everything is read from shapes: ``rank`` from the kv norm, ``rope`` from ``kv_a``, and the head count and dims
from ``q_out = H (nope + rope)``, ``kv_b_out = H (nope + v)``, ``o_in = H v``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from surgery.sites.rotary import Rotary

#: The sub-graph's child names, as every MLA family of transformers spells them.
Q_LORA = ("q_a_proj", "q_a_layernorm", "q_b_proj")
#: AXK2: the last query projection reads ``[normed | raw]`` query latents and also gives a per-channel output gate.
Q_GATE = ("q_a_proj", "q_a_layernorm", "q_gate_proj")
Q_FULL = ("q_proj",)
KV = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")
#: A norm on the shared rotary key part ``k_pe`` before RoPE (Dots3).
K_ROPE_NORMS = ("k_rope_only_layernorm",)


@dataclass(frozen=True)
class LatentQKV:
    """How one MLA module makes q, k and v (no tensors; valid on the meta device)."""

    q_names: tuple[str, ...]  # Q_LORA, Q_GATE or Q_FULL
    kv_names: tuple[str, ...]  # KV
    rank: int  # width of the kv latent (kv_lora_rank)
    nope_dim: int  # per-head query/key dims without RoPE
    rope_dim: int  # trailing per-head query/key dims with RoPE (the shared key part k_pe)
    q_scale: float = 1.0  # multiplies q (LongCat's mla_scale_q_lora)
    latent_scale: float = 1.0  # multiplies the normalised latent (LongCat's mla_scale_kv_lora, Dots3's kv_lora_scale)
    q_latent_scale: float = 1.0  # multiplies the normalised query latent before q_b_proj (Dots3's q_lora_scale)
    k_rope_norm: str | None = None  # child normalising k_pe before RoPE (Dots3's k_rope_only_layernorm)

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.q_names, *self.kv_names, *((self.k_rope_norm,) if self.k_rope_norm else ()))

    @property
    def q_gate(self) -> bool:
        """Whether the query projection also gives the output gate (``Q_GATE``)."""
        return self.q_names == Q_GATE


class LatentParts(NamedTuple):
    """What ``latent_compress`` computes from ``x`` ``[B, T, C]``, before RoPE."""

    q: Tensor  # [B, T, H, nope + rope]
    c: Tensor  # [B, T, rank], the normalised (and scaled) key/value latent
    k_pe: Tensor  # [B, T, rope], the shared rotary key part
    q_latent: Tensor | None  # [B, T, q_rank], the normalised (and scaled) query latent; None without a query rank
    gate: Tensor | None  # [B, T, H * v] output gate logits (Q_GATE), else None


def is_latent(module: nn.Module) -> bool:
    """Whether ``module`` has MLA's compressed key/value projections."""
    children = dict(module.named_children())
    return all(children.get(name) is not None for name in KV)


def latent_rotary(module: nn.Module, cfg: Any, latent: LatentQKV) -> Rotary:
    """The site's ``Rotary``: RoPE on the trailing ``rope_dim`` dims only, in the family's pair convention."""
    return Rotary("latent", trailing=latent.rope_dim, interleaved=_uses_interleaved_rope(module, cfg))


def _uses_interleaved_rope(module: nn.Module, cfg: Any) -> bool:
    """Whether the module's forward rotates interleaved pairs; the convention is code, not a shape.

    Families call transformers' ``apply_rotary_pos_emb_interleave`` always (LongCat, DeepSeek-V3.2), or choose
    between it and ``apply_rotary_pos_emb`` with ``config.rope_interleave`` (DeepSeek-V3, GLM-4-MoE-Lite).
    DeepSeek-V2's complex ``freqs_cis`` is recognised from the position embeddings themselves (``Rotary.apply``).
    """
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    names = set(code.co_names) if code is not None else set()
    if "apply_rotary_pos_emb_interleave" not in names:
        return False
    if "apply_rotary_pos_emb" in names:
        return bool(getattr(cfg, "rope_interleave", False))
    return True


def _float_attr(module: nn.Module, name: str) -> float:
    value = getattr(module, name, 1.0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0


def read_latent(module: nn.Module, cfg: Any) -> tuple[LatentQKV, dict[str, int]]:
    """The latent description of ``module`` and its dims (``num_heads``, ``head_dim``, ``v_head_dim``).

    Raises:
        ValueError: the widths do not fit one MLA layout (the message says which).
    """
    children = dict(module.named_children())
    present = ", ".join(children)
    paths = (Q_LORA, Q_GATE, Q_FULL)
    q_names = next((names for names in paths if all(children.get(n) is not None for n in names)), None)
    if q_names is None:
        raise ValueError(f"latent attention without a readable query path: expected {'/'.join(Q_LORA)}, "
                         f"{'/'.join(Q_GATE)} or {Q_FULL[0]} (children: {present})")
    if any(not isinstance(children.get(n), nn.Linear) for n in (*q_names[::2], KV[0], KV[2], "o_proj")):
        want = "/".join(q_names[::2] + KV[::2])
        raise ValueError(f"latent attention needs torch.nn.Linear {want} and o_proj (children: {present})")
    kv_norm_weight = getattr(children[KV[1]], "weight", None)
    if not isinstance(kv_norm_weight, Tensor) or kv_norm_weight.dim() != 1:
        raise ValueError(f"{KV[1]} has no 1-D weight to read the latent rank from")
    rank = kv_norm_weight.shape[0]
    q_out = children[q_names[-1]].out_features
    if q_names == Q_GATE and children[Q_GATE[2]].in_features != 2 * children[Q_GATE[0]].out_features:
        raise ValueError(f"{Q_GATE[2]} reads {children[Q_GATE[2]].in_features} features; a fused query/gate "
                         f"projection reads the normed and raw query latents, 2 x {children[Q_GATE[0]].out_features}")
    kv_a_out, kv_b_out = children[KV[0]].out_features, children[KV[2]].out_features
    o_in = children["o_proj"].in_features
    rope = kv_a_out - rank
    heads_x_nope = kv_b_out - o_in
    # A fused gate adds H v rows (one gate per output channel) to the query projection.
    q_rope = q_out - heads_x_nope - (o_in if q_names == Q_GATE else 0)
    heads = q_rope // rope if rope > 0 else 0
    if rope <= 0 or heads <= 0 or heads * rope != q_rope or heads_x_nope % heads or o_in % heads:
        want = "H (nope + rope + v)" if q_names == Q_GATE else "H (nope + rope)"
        raise ValueError(f"widths q {q_out}, kv_a {kv_a_out} (rank {rank}), kv_b {kv_b_out}, o {o_in} do not fit "
                         f"q = {want}, kv_a = rank + rope, kv_b = H (nope + v), o = H v")  # fmt: skip
    nope, v_dim = heads_x_nope // heads, o_in // heads
    k_rope_norm = next((n for n in K_ROPE_NORMS if children.get(n) is not None), None)
    if k_rope_norm is not None and tuple(getattr(children[k_rope_norm], "weight", torch.empty(0)).shape) != (rope,):
        raise ValueError(f"{k_rope_norm} has no weight of the rotary key width ({rope},)")
    latent_scale = _float_attr(module, "mla_scale_kv_lora") * _float_attr(module, "kv_lora_scale")
    latent = LatentQKV(
        q_names, KV, rank, nope, rope, q_scale=_float_attr(module, "mla_scale_q_lora"), latent_scale=latent_scale,
        q_latent_scale=_float_attr(module, "q_lora_scale") if q_names != Q_FULL else 1.0, k_rope_norm=k_rope_norm,
    )  # fmt: skip
    return latent, {"num_heads": heads, "head_dim": nope + rope, "v_head_dim": v_dim}


def latent_weights(module: nn.Module, latent: LatentQKV) -> dict[str, Tensor]:
    """The sub-graph's tensors under the module's own names (``q_a_proj.weight``, ``kv_a_layernorm.weight``...)."""
    out: dict[str, Tensor] = {}
    for name in latent.names:
        for pname, param in getattr(module, name).named_parameters():
            out[f"{name}.{pname}"] = param.detach()
    return out


def latent_compress(mixer: nn.Module, x: Tensor, latent: LatentQKV, heads: int) -> LatentParts:
    """``x`` ``[B, T, C]`` -> q, the key/value latent, ``k_pe`` (all before RoPE), the query latent and the fused
    gate logits (``LatentParts``).

    ``mixer`` owns copies of the sub-graph's children under their own names. The arithmetic is the pretrained
    module's, step for step, so that a kept layer is bit-identical.
    """
    B, T, _ = x.shape
    q_latent = gate = None
    if latent.q_names == Q_FULL:
        q = getattr(mixer, Q_FULL[0])(x)
    else:
        q_a, q_norm, q_b = (getattr(mixer, n) for n in latent.q_names)
        raw = q_a(x)
        q_latent = q_norm(raw)
        if latent.q_latent_scale != 1.0:
            q_latent = q_latent * latent.q_latent_scale
        q = q_b(torch.cat([q_latent, raw], dim=-1) if latent.q_gate else q_latent)
    if latent.q_gate:
        # Per head [nope + rope | v]: the query, then the gate of that head's output channels.
        qk = latent.nope_dim + latent.rope_dim
        q, gate = q.view(B, T, heads, -1).split([qk, q.shape[-1] // heads - qk], dim=-1)
        gate = gate.reshape(B, T, -1)
    q = q.view(B, T, heads, latent.nope_dim + latent.rope_dim)
    if latent.q_scale != 1.0:
        q = q * latent.q_scale
    kv_a, kv_norm = getattr(mixer, latent.kv_names[0]), getattr(mixer, latent.kv_names[1])
    c, k_pe = kv_a(x).split([latent.rank, latent.rope_dim], dim=-1)
    c = kv_norm(c)
    if latent.latent_scale != 1.0:
        c = c * latent.latent_scale
    if latent.k_rope_norm is not None:
        k_pe = getattr(mixer, latent.k_rope_norm)(k_pe)
    return LatentParts(q, c, k_pe, q_latent, gate)


def latent_gate(o: Tensor, gate: Tensor) -> Tensor:
    """The attention output ``o`` ``[B, T, H * v]`` times ``sigmoid`` of the fused gate logits ``[B, T, H * v]``,
    in fp32 as AXK2 computes it."""
    return (o * torch.sigmoid(gate.float())).to(o.dtype)


def latent_expand(mixer: nn.Module, c: Tensor, k_pe: Tensor, latent: LatentQKV, heads: int) -> tuple[Tensor, Tensor]:
    """Latent ``[B, S, rank]`` and ``k_pe`` ``[B, S, rope]`` -> k ``[B, S, H, nope + rope]``, v ``[B, S, H, Dv]``."""
    B, S, _ = c.shape
    kv = getattr(mixer, latent.kv_names[2])(c).view(B, S, heads, -1)
    k_nope, v = kv[..., : latent.nope_dim], kv[..., latent.nope_dim :]
    k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, heads, latent.rope_dim)], dim=-1)
    return k, v


def latent_project(mixer: nn.Module, x: Tensor, latent: LatentQKV, heads: int) -> tuple[LatentParts, Tensor, Tensor]:
    """``x`` ``[B, T, C]`` -> ``latent_compress``'s parts (q ``[B, T, H, nope + rope]`` before RoPE among them), k
    ``[B, T, H, nope + rope]`` (before RoPE) and v ``[B, T, H, v_head_dim]``."""
    parts = latent_compress(mixer, x, latent, heads)
    return (parts, *latent_expand(mixer, parts.c, parts.k_pe, latent, heads))


def latent_softmax_inputs(
    mixer: Any, x: Tensor, latent: LatentQKV, heads: int, position_embeddings: Any, cache: Any, **kwargs: Any
) -> tuple[Tensor, Tensor, Tensor, LatentParts]:
    """Post-RoPE q ``[B, H, T, D]``, k ``[B, H, S, D]`` and v ``[B, H, S, Dv]`` for softmax attention over the cache,
    and ``latent_compress``'s parts of this call (the query latent a DSA indexer reads, the fused gate).

    Like the pretrained module, the cache holds the compressed latent ``[B, 1, S, rank]`` and the rotated ``k_pe``
    ``[B, 1, S, rope]`` rather than per-head keys and values (far smaller), and expands them at every call.
    ``mixer.rotate`` turns q's trailing rope dims and all of ``k_pe`` (the site's ``latent`` rotary convention).
    """
    parts = latent_compress(mixer, x, latent, heads)
    # k_pe as one key "head", as the pretrained module's cache layers expect it.
    q, k_pe = mixer.rotate(parts.q, parts.k_pe[:, :, None], position_embeddings)
    c = parts.c[:, None]
    if cache is not None:
        c, k_pe = cache.update(c, k_pe, mixer.layer_idx, **kwargs)
    k, v = latent_expand(mixer, c[:, 0], k_pe[:, 0], latent, heads)
    # Contiguous keys like the pretrained module's: attention kernels may sum in another order over other strides.
    return q, k.transpose(1, 2).contiguous(), v.transpose(1, 2), parts
