"""Multi-head latent attention (MLA): q/k/v produced by the model's own low-rank projection sub-graph.

DeepSeek-V2/V3 and the families built on them (MiniCPM3, GLM-4-MoE-Lite, Youtu, LongCat-Flash, ...) have no
q/k/v projections to read. Per token ``x`` ``[C]`` and head ``h``::

    q_h       = q_b(q_a_norm(q_a(x)))_h          (or q_proj(x)_h without a query rank)   [nope | rope]
    c, k_pe   = kv_a(x)                           latent [rank] and one rotary key [rope] shared by all heads
    k_nope_h, v_h = kv_b(kv_a_norm(c))_h           [nope], [v_head_dim]
    k_h       = [k_nope_h | k_pe]

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
from typing import Any

import torch
from torch import Tensor, nn

from surgery.rotary import Rotary

#: The sub-graph's child names, as every MLA family of transformers spells them.
Q_LORA = ("q_a_proj", "q_a_layernorm", "q_b_proj")
Q_FULL = ("q_proj",)
KV = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")


@dataclass(frozen=True)
class LatentQKV:
    """How one MLA module makes q, k and v (no tensors; valid on the meta device)."""

    q_names: tuple[str, ...]  # Q_LORA or Q_FULL
    kv_names: tuple[str, ...]  # KV
    rank: int  # width of the kv latent (kv_lora_rank)
    nope_dim: int  # per-head query/key dims without RoPE
    rope_dim: int  # trailing per-head query/key dims with RoPE (the shared key part k_pe)
    q_scale: float = 1.0  # multiplies q (LongCat's mla_scale_q_lora)
    latent_scale: float = 1.0  # multiplies the normalised latent (LongCat's mla_scale_kv_lora)

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.q_names, *self.kv_names)


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
    q_names = next((names for names in (Q_LORA, Q_FULL) if all(children.get(n) is not None for n in names)), None)
    if q_names is None:
        raise ValueError(f"latent attention without a readable query path: expected {'/'.join(Q_LORA)} or "
                         f"{Q_FULL[0]} (children: {present})")
    if any(not isinstance(children.get(n), nn.Linear) for n in (*q_names[::2], KV[0], KV[2], "o_proj")):
        want = "/".join(q_names[::2] + KV[::2])
        raise ValueError(f"latent attention needs torch.nn.Linear {want} and o_proj (children: {present})")
    kv_norm_weight = getattr(children[KV[1]], "weight", None)
    if not isinstance(kv_norm_weight, Tensor) or kv_norm_weight.dim() != 1:
        raise ValueError(f"{KV[1]} has no 1-D weight to read the latent rank from")
    rank = kv_norm_weight.shape[0]
    q_out = children[q_names[-1]].out_features
    kv_a_out, kv_b_out = children[KV[0]].out_features, children[KV[2]].out_features
    o_in = children["o_proj"].in_features
    rope = kv_a_out - rank
    heads_x_nope = kv_b_out - o_in
    heads = (q_out - heads_x_nope) // rope if rope > 0 else 0
    if rope <= 0 or heads <= 0 or heads * rope != q_out - heads_x_nope or heads_x_nope % heads or o_in % heads:
        raise ValueError(f"widths q {q_out}, kv_a {kv_a_out} (rank {rank}), kv_b {kv_b_out}, o {o_in} do not fit "
                         "q = H (nope + rope), kv_a = rank + rope, kv_b = H (nope + v), o = H v")  # fmt: skip
    nope, v_dim = heads_x_nope // heads, o_in // heads
    latent = LatentQKV(
        q_names, KV, rank, nope, rope,
        q_scale=_float_attr(module, "mla_scale_q_lora"), latent_scale=_float_attr(module, "mla_scale_kv_lora"),
    )  # fmt: skip
    return latent, {"num_heads": heads, "head_dim": nope + rope, "v_head_dim": v_dim}


def latent_weights(module: nn.Module, latent: LatentQKV) -> dict[str, Tensor]:
    """The sub-graph's tensors under the module's own names (``q_a_proj.weight``, ``kv_a_layernorm.weight``...)."""
    out: dict[str, Tensor] = {}
    for name in latent.names:
        for pname, param in getattr(module, name).named_parameters():
            out[f"{name}.{pname}"] = param.detach()
    return out


def latent_compress(mixer: nn.Module, x: Tensor, latent: LatentQKV, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` ``[B, T, C]`` -> q ``[B, T, H, nope + rope]`` (before RoPE), latent ``[B, T, rank]`` (normalised) and the
    shared rotary key part ``k_pe`` ``[B, T, rope]`` (before RoPE).

    ``mixer`` owns copies of the sub-graph's children under their own names. The arithmetic is the pretrained
    module's, step for step, so that a kept layer is bit-identical.
    """
    B, T, _ = x.shape
    q_mods = [getattr(mixer, n) for n in latent.q_names]
    q = q_mods[0](x)
    for mod in q_mods[1:]:
        q = mod(q)
    q = q.view(B, T, heads, latent.nope_dim + latent.rope_dim)
    if latent.q_scale != 1.0:
        q = q * latent.q_scale
    kv_a, kv_norm = getattr(mixer, latent.kv_names[0]), getattr(mixer, latent.kv_names[1])
    c, k_pe = kv_a(x).split([latent.rank, latent.rope_dim], dim=-1)
    c = kv_norm(c)
    if latent.latent_scale != 1.0:
        c = c * latent.latent_scale
    return q, c, k_pe


def latent_expand(mixer: nn.Module, c: Tensor, k_pe: Tensor, latent: LatentQKV, heads: int) -> tuple[Tensor, Tensor]:
    """Latent ``[B, S, rank]`` and ``k_pe`` ``[B, S, rope]`` -> k ``[B, S, H, nope + rope]``, v ``[B, S, H, Dv]``."""
    B, S, _ = c.shape
    kv = getattr(mixer, latent.kv_names[2])(c).view(B, S, heads, -1)
    k_nope, v = kv[..., : latent.nope_dim], kv[..., latent.nope_dim :]
    k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, heads, latent.rope_dim)], dim=-1)
    return k, v


def latent_project(mixer: nn.Module, x: Tensor, latent: LatentQKV, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` ``[B, T, C]`` -> q, k ``[B, T, H, nope + rope]`` (before RoPE) and v ``[B, T, H, v_head_dim]``."""
    q, c, k_pe = latent_compress(mixer, x, latent, heads)
    return (q, *latent_expand(mixer, c, k_pe, latent, heads))


def latent_softmax_inputs(
    mixer: Any, x: Tensor, latent: LatentQKV, heads: int, position_embeddings: Any, cache: Any, **kwargs: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Post-RoPE q ``[B, H, T, D]``, k ``[B, H, S, D]`` and v ``[B, H, S, Dv]`` for softmax attention over the cache.

    Like the pretrained module, the cache holds the compressed latent ``[B, 1, S, rank]`` and the rotated ``k_pe``
    ``[B, 1, S, rope]`` rather than per-head keys and values (far smaller), and expands them at every call.
    ``mixer.rotate`` turns q's trailing rope dims and all of ``k_pe`` (the site's ``latent`` rotary convention).
    """
    q, c, k_pe = latent_compress(mixer, x, latent, heads)
    # k_pe as one key "head", as the pretrained module's cache layers expect it.
    q, k_pe = mixer.rotate(q, k_pe[:, :, None], position_embeddings)
    c = c[:, None]
    if cache is not None:
        c, k_pe = cache.update(c, k_pe, mixer.layer_idx, **kwargs)
    k, v = latent_expand(mixer, c[:, 0], k_pe[:, 0], latent, heads)
    # Contiguous keys like the pretrained module's: attention kernels may sum in another order over other strides.
    return q, k.transpose(1, 2).contiguous(), v.transpose(1, 2)
