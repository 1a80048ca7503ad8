"""The ``pooled_key_gate`` weight map: Liger's gate pooling, as an initialisation of a separate gate projection.

Liger computes its gate as ``AdaptiveAvgPool1d(k_proj(x))`` (liger.md section 2.1). The pool is linear, so it is the
projection ``g_proj = P k_proj`` with P averaging groups of adjacent key dimensions; with ``pool_size == head_dim``
(what the released GLA/HGRN2 models use) P is the identity and ``g_proj`` starts as a copy of ``k_proj``. Mixers
built with ``gate: projection`` own such a ``g_proj`` (the map says so in ``needs``, not by naming mixers); the default ``gate: key`` reads the key itself and needs no
map beyond ``copy_qkvo``. The difference only shows once training starts: LoRA on ``k_proj`` moves a ``gate: key``
gate, not a ``g_proj`` one.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field
from torch import Tensor

from surgery.hookspecs import hookimpl
from surgery.mixer import Mixer, WeightMap
from surgery.plugins.weight_maps import CopyQKVO


def pool_rows(w: Tensor, num_kv_heads: int, head_dim: int, pool_size: int) -> Tensor:
    """Average each kv head's ``head_dim`` rows of ``w`` ``[Hkv * D, ...]`` in ``pool_size`` groups of adjacent rows.

    Every row of a group gets the group's mean, so the result keeps ``w``'s shape: one gate value per key dimension,
    ``pool_size`` distinct values per head.
    """
    rest = w.shape[1:]
    g = w.reshape(num_kv_heads, pool_size, head_dim // pool_size, *rest)
    return g.mean(2, keepdim=True).expand_as(g).reshape(w.shape).clone()


class PooledKeyGate(WeightMap):
    """Copy q/k/v/o (and q/k norms); set ``g_proj`` to the pooled ``k_proj`` (weight and bias)."""

    name = "pooled_key_gate"
    description = "copy_qkvo, plus g_proj = k_proj averaged over pool_size groups of adjacent key dims per head."
    needs = {"g_proj": "build the mixer with gate: projection"}

    class Options(WeightMap.Options):
        pool_size: int | None = Field(
            None, ge=1, description="distinct gate values per kv head; must divide head_dim; None: head_dim (a copy)"
        )

    def __call__(self, src: Mapping[str, Tensor], dst: Mixer) -> dict[str, Tensor]:
        where = f"pooled_key_gate (layer {dst.layer_idx}, mixer '{dst.name}')"
        # g_proj may sit in the mixer itself or in a branch of it (liger_attention's recurrent.g_proj).
        gates = [(n, m) for n, m in dst.named_modules() if n.rsplit(".", 1)[-1] == "g_proj"]
        if not gates:
            raise ValueError(f"{where}: the mixer has no g_proj; set its option gate: projection, or use copy_qkvo")
        d, h = dst.head_dim, dst.num_kv_heads
        m = self.options.pool_size or d
        if m > d or d % m:
            raise ValueError(f"{where}: pool_size={m} must divide head_dim={d}")
        if "k_proj.weight" not in src:
            raise ValueError(f"{where}: the pretrained attention has no k_proj.weight to pool")
        out = CopyQKVO()(src, dst)
        for name, g_proj in gates:
            out[f"{name}.weight"] = pool_rows(src["k_proj.weight"], h, d, m)
            if g_proj.bias is not None:
                if "k_proj.bias" not in src:
                    raise ValueError(f"{where}: {name} has a bias but the pretrained k_proj has none")
                out[f"{name}.bias"] = pool_rows(src["k_proj.bias"], h, d, m)
        return out


@hookimpl
def surgery_weight_maps() -> list[type[WeightMap]]:
    return [PooledKeyGate]
