"""The ``mom`` mixer, Mixture-of-Memories (arXiv 2502.13685), and its weight map ``mom_from_attention``.

M memories, each a gated linear recurrence of a registered recurrent mixer (``recurrent: {mixer, options}``, default
``gla``, whose ``recur`` runs them: MoM never restates a formula). A router sends each token to k of them; a shared memory sees
every token. With shared pre-RoPE queries ``q`` and per-memory keys/values ``k^m = x W_k^m``, ``v^m = x W_v^m``::

    p_t = softmax(x_t W_r)  (softmax in fp32),   (w_t, E_t) = top-k(p_t),   w_t <- w_t / sum(w_t)
    S^m_t = REC(S^m_{t-1}; k^m_t, v^m_t)  if m in E_t  else  S^m_{t-1}          (per sequence, per kv head)
    o_t = sum_{j<k} w_{t,j} q_t S^{E_{t,j}}_t  +  q_t S^shared_t,        y = o_proj(o)

The shared memory uses the mixer's own (pretrained) ``k_proj``/``v_proj``, or the parent's when ``mom`` is the
recurrent branch of ``liger_attention``. Queries and ``o_proj`` are shared and pretrained. In training mode the
mixer sets ``aux_loss = aux_loss_scale * M * sum_e frac_e * P_e`` (1 before scaling when routing is uniform).

Parameters: ``router`` (``nn.Linear(C, M)``, no bias), ``k_mem``/``v_mem`` (``MemoryLinear``: weight
``[M, Hkv * D, C]``, bias ``[M, Hkv * D]`` when the model's qkv has one), ``g_mem`` likewise with ``gate:
projection``, and ``k_mem_norm`` (a copy of the model's k norm, if it has one). Stacked weights rather than a
``ModuleList``: the routed rows, grouped by memory, go through their own memory's map in one grouped GEMM
(``torch._grouped_mm`` over device-side group ends: no host sync), k / M of the work of projecting every memory. Where
that kernel does not run (fp32 on CUDA, pre-Hopper GPUs, unaligned widths), all M projections are one plain GEMM,
``x @ W.view(M * Hkv * D, C).T``, and the routed rows are selected from it.

Cache: the state tuple is the recurrence's own entries with shape ``[B, M, ...]`` (e.g. ``[B, M, Hkv, D, D]`` for
gla), followed, with ``shared_memory``, by the shared memory's ``[B, ...]`` entries. Batch first, so the cache's
beam-search reordering and batch selection work unchanged. A decode step updates only the k chosen memories.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from surgery.hookspecs import hookimpl
from surgery.mixer import Mixer, MixerDimsError, Options, WeightMap
from surgery.options import fail, problem
from surgery.plugins.mom_dispatch import MemoryRows, Packing, dense_rows, dispatch, load_balancing_loss, route
from surgery.plugins.mom_dispatch import tokens_per_memory
from surgery.plugins.weight_maps import CopyQKVO
from surgery.recurrent import RecurrentBranch, RecurrentMixer, State
from surgery.sites.attention import AttentionSite


class MemoryLinear(nn.Module):
    """M linear maps ``C -> F`` evaluated as one GEMM: ``x`` ``[..., C]`` -> ``[..., M, F]``.

    ``weight`` ``[M, F, C]`` (memory m's rows are ``weight[m]``, laid out like an ``nn.Linear`` weight), ``bias``
    ``[M, F]`` or None. Initialised like ``nn.Linear``; ``mom_from_attention`` overwrites it.
    """

    def __init__(self, num: int, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num, out_features)) if bias else None
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        M, Fo, C = self.weight.shape
        bias = self.bias.reshape(M * Fo) if self.bias is not None else None
        return F.linear(x, self.weight.reshape(M * Fo, C), bias).view(*x.shape[:-1], M, Fo)

    def rows(self, x: Tensor, memory: Tensor, ends: Tensor) -> Tensor:
        """Row r of ``x`` ``[R, C]`` through memory ``memory[r]``'s map alone: ``[R, F]``, one grouped GEMM.

        Rows come grouped by memory; memory m's rows end at ``ends[m]`` (``[M]`` int32, no host sync). Only
        usable where ``grouped(x)`` says so.
        """
        dtype = _compute_dtype(x)
        # [M, F, C] viewed as [M, C, F]: the column-major operand the grouped kernel takes without a copy.
        out = torch._grouped_mm(x.to(dtype), self.weight.to(dtype).transpose(1, 2), offs=ends)
        return out if self.bias is None else out + self.bias.to(out.dtype).index_select(0, memory)

    def grouped(self, x: Tensor) -> bool:
        """Whether ``rows`` runs for ``x``: CUDA's grouped kernel (bf16 on Hopper/Blackwell; elsewhere torch's
        fallback copies the offsets to the host, a sync per call) or the CPU form (fp32/bf16/fp16); rows of 16 bytes.
        """
        if not hasattr(torch, "_grouped_mm"):
            return False
        dtype, C = _compute_dtype(x), self.weight.shape[-1]
        if (C * dtype.itemsize) % 16 or (self.weight.shape[1] * dtype.itemsize) % 16:
            return False
        if x.device.type == "cuda":
            return dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] in (9, 10)
        return x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)

    def extra_repr(self) -> str:
        M, Fo, C = self.weight.shape
        return f"memories={M}, in_features={C}, out_features={Fo}, bias={self.bias is not None}"


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would compute ``x`` in: autocast's where it is on (``_grouped_mm`` is not cast)."""
    on = torch.is_autocast_enabled(x.device.type)
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


class MoM(RecurrentMixer):
    """Mixture-of-Memories over a registered recurrence: routed per-memory k/v, shared q/o, a shared memory."""

    name = "mom"
    description = "Mixture-of-Memories: top-k routing over M gated linear memories (+ a shared one) of a recurrence."
    default_weights = "mom_from_attention"
    test_options = (
        {},
        # shared_memory false is covered by tests/test_mom.py: there the pretrained k_proj/v_proj go unused, which
        # the conformance suite's "values always learn" check rightly flags.
        {"num_memories": 2, "topk": 1},
        {"num_memories": 3, "recurrent": {"mixer": "gsa", "options": {"num_slots": 4}}, "gate": "projection"},
    )

    class Options(RecurrentMixer.Options):
        num_memories: int = Field(4, ge=1, description="routed memories M")
        topk: int = Field(2, ge=1, description="memories each token is written to and read from (k <= M)")
        shared_memory: bool = Field(True, description="add a memory that sees every token, with the pretrained k/v")
        recurrent: RecurrentBranch = Field(
            "gla", validate_default=True,
            description="the recurrent mixer each memory runs, {mixer, options} (its gate is mom's own 'gate')")
        aux_loss_scale: float = Field(1e-3, ge=0, description="weight of the load-balancing loss (0: none)")

        @model_validator(mode="before")
        @classmethod
        def _moved_keys(cls, data: Any) -> Any:
            """The keys of the old spelling name the new one, at their own location."""
            if isinstance(data, dict):
                moved = [k for k in ("recurrence", "recurrence_options") if k in data]
                if moved:
                    fail([problem((k,), f"{k} is no longer a key: write recurrent: {{mixer: NAME, options: {{...}}}} "
                                       "(the one spelling of a nested mixer, as in liger_attention)", data[k])
                          for k in moved], cls.__qualname__)  # fmt: skip
            return data

        @model_validator(mode="after")
        def _check(self) -> MoM.Options:
            if self.topk > self.num_memories:
                raise ValueError(f"topk={self.topk} must not exceed num_memories={self.num_memories}")
            if self.recurrent.mixer == "mom":
                raise ValueError("recurrent: 'mom' cannot be its own memory; name a plain recurrence such as gla")
            if self.recurrent.options.gate != "key":
                raise ValueError("recurrent.options.gate: set 'gate' on mom itself (it applies to every memory)")
            return self

    def __init__(self, site: AttentionSite, options: Options, config: Any, *, projections: bool = True) -> None:
        super().__init__(site, options, config, projections=projections)
        d, M = site.dims, options.num_memories
        width, v_width = d.num_kv_heads * d.head_dim, d.num_kv_heads * self.v_head_dim
        # The memories' cell: the recurrence without projections, and with gate "key" since mom hands it the gate.
        inner = options.recurrent.options.model_copy(update={"gate": "key"})
        self.recurrence = options.recurrent.cls(site, inner, config, projections=False)
        self.router = nn.Linear(d.hidden_size, M, bias=False)
        self.k_mem = MemoryLinear(M, d.hidden_size, width, d.qkv_bias)
        self.v_mem = MemoryLinear(M, d.hidden_size, v_width, d.qkv_bias)
        self.g_mem = MemoryLinear(M, d.hidden_size, width, d.qkv_bias) if options.gate == "projection" else None
        # Own copy even when the mixer has k_norm: as liger's branch (projections=False) it has none to share.
        self.k_mem_norm = copy.deepcopy(site.k_norm) if site.k_norm is not None else None
        # Tokens routed to each memory since the last reset (real tokens x choices); not part of the checkpoint.
        self.register_buffer("token_counts", torch.zeros(M, dtype=torch.long), persistent=False)

    @classmethod
    def resolve_options(cls, site: AttentionSite, options: Options) -> Options:
        branch = options.recurrent
        resolved = branch.cls.resolve_options(site, branch.options)
        if resolved is branch.options:
            return options
        return options.model_copy(update={"recurrent": branch.with_options(resolved)})

    @classmethod
    def check_site(cls, site: AttentionSite, options: Options) -> None:
        if site.latent is not None:
            raise MixerDimsError("mom builds each memory's key/value projection from the pretrained k_proj/v_proj; "
                                 "multi-head latent attention has none (its keys/values come from a shared latent)")
        options.recurrent.cls.check_site(site, options.recurrent.options)

    def stats(self) -> dict[str, Any]:
        """``tokens_per_memory``: (real token, choice) pairs routed to each memory since the last reset."""
        return {"tokens_per_memory": self.token_counts.tolist()}

    def reset_stats(self) -> None:
        self.token_counts.zero_()

    def recur(self, *args: Any, **kwargs: Any) -> tuple[Tensor, State | None]:
        raise NotImplementedError(
            "mom routes on the hidden states, which recur() does not receive; call recurrent_output(x, q, k, v, ...)"
        )

    def memories(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Every memory's key, value and gate input for every token: ``[B, T, M, Hkv, D]`` each (values ``Dv``;
        gate None: key)."""
        B, T, _ = x.shape
        shape = (B, T, self.options.num_memories, self.num_kv_heads, self.head_dim)
        keys = self.k_mem(x).view(shape)
        gates = self.g_mem(x).view(shape) if self.g_mem is not None else None
        values = self.v_mem(x).view(*shape[:-1], self.v_head_dim)
        return self._finish(keys, values, gates)

    def _finish(self, keys: Tensor, values: Tensor, gates: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The model's k norm on keys and its value scale on values, as its attention applies them."""
        if self.k_mem_norm is not None:
            keys = self.k_mem_norm(keys)
        if self.site.dims.value_scale != 1.0:
            values = values * self.site.dims.value_scale
        return keys, values, gates

    def memory_rows(self, x: Tensor) -> MemoryRows:
        """Each routed row's key/value/gate through its own memory, for ``x`` ``[B, T, C]``.

        Where a grouped GEMM runs (``MemoryLinear.grouped``), only the k routed memories of a token are projected:
        k / M of the work of projecting all of them, and no ``[B, T, M, ...]`` tensors kept for the backward.
        Elsewhere every memory's projection is computed once and the routed rows are selected (``dense_rows``).
        """
        if not self.k_mem.grouped(x):
            return dense_rows(*self.memories(x))

        def rows(p: Packing) -> tuple[Tensor, Tensor, Tensor | None]:
            x_rows = p.tokens(x.reshape(-1, x.shape[-1]))  # [R, C]

            def project(lin: MemoryLinear, dim: int) -> Tensor:
                return lin.rows(x_rows, p.memory, p.ends).view(-1, self.num_kv_heads, dim)

            gates = project(self.g_mem, self.head_dim) if self.g_mem is not None else None
            return self._finish(project(self.k_mem, self.head_dim), project(self.v_mem, self.v_head_dim), gates)

        return rows

    def recurrent_output(
        self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, state: State | None, want_state: bool
    ) -> tuple[Tensor, State | None]:
        """``sum_j w_j o_{memory j} + o_shared`` ``[B, T, Hq, D]`` fp32 for ``x`` ``[B, T, C]``, projected ``q``
        ``[B, T, Hq, D]`` and ``k``/``v`` ``[B, T, Hkv, D]`` (the shared memory's); ``state`` as the module doc says.
        """
        opts = self.options
        # Logits in the compute dtype (as a linear layer under autocast computes them), softmax and top-k in fp32
        # (route): an fp32 copy of x for a d -> M product would cost more than the product.
        routing = route(self.router(x), opts.topk)
        counts = tokens_per_memory(routing, valid, opts.num_memories)
        first = torch._C._current_graph_task_id() == -1  # not a forward recomputed in backward (checkpointing)
        if first:
            with torch.no_grad():
                self.token_counts += counts
        if self.training and opts.aux_loss_scale > 0:
            # Computed by a recomputed forward too (it must save what the first one saved), but kept from the first
            # only: one set in the backward would be a stale loss for the next step.
            aux = opts.aux_loss_scale * load_balancing_loss(routing, valid, counts)
            if first:
                self.aux_loss = aux
        n = 0 if state is None else (len(state) // 2 if opts.shared_memory else len(state))
        routed = None if state is None else state[:n]
        o, routed = dispatch(self.recurrence.recur, q, self.memory_rows(x), routing, valid, routed, want_state)
        if not opts.shared_memory:
            return o, routed
        shared = None if state is None else state[n:]
        o_shared, shared = self.recurrence.recur(q, k, v, self.gate_source(x, k), valid, shared, want_state)
        out_state = (*routed, *shared) if want_state and routed is not None and shared is not None else None
        return o + o_shared, out_state


class MoMFromAttention(WeightMap):
    """copy_qkvo, plus every memory's k/v (and gate) from the pretrained k/v, and a near-uniform router.

    The shared memory keeps the pretrained k/v exactly (they are the mixer's, or its parent's, ``k_proj``/``v_proj``).
    Memory m gets ``W * (1 + noise * u_m)``, ``u_m`` uniform in [-1, 1], seeded by ``seed`` and the layer index;
    biases and the k norm are copied. With ``gate: projection`` the gate projections start as the (perturbed) key
    projections, as ``pooled_key_gate`` does at full pool size. The router gets ``N(0, router_std^2)`` weights: close
    to uniform, yet not exactly, so that ties do not send every token to the first k memories.
    """

    name = "mom_from_attention"
    description = "copy_qkvo; every MoM memory's k/v from the pretrained k/v (+ optional seeded noise); tiny router."
    needs = {"router": "a mom mixer: mixer mom, or liger_attention with recurrent: {mixer: mom}"}

    class Options(WeightMap.Options):
        noise: float = Field(0.0, ge=0, lt=1, description="relative uniform noise on each memory's k/v weights")
        router_std: float = Field(1e-3, ge=0, description="std of the router's initial weights (0: exactly uniform)")
        seed: int = Field(0, description="seed of the noise and the router (combined with the layer index)")

    def __call__(self, src: Mapping[str, Tensor], dst: Mixer) -> dict[str, Tensor]:
        where = f"mom_from_attention (layer {dst.layer_idx}, mixer '{dst.name}')"
        moms = [(n, m) for n, m in dst.named_modules() if isinstance(m, MoM)]
        if not moms:
            raise ValueError(f"{where}: the mixer contains no mom memories; use mixer mom or recurrent: mom")
        for key in ("k_proj.weight", "v_proj.weight"):
            if key not in src:
                raise ValueError(f"{where}: the pretrained attention has no {key}")
        out = CopyQKVO()(src, dst)
        gen = torch.Generator().manual_seed(self.options.seed * 1_000_003 + dst.layer_idx)
        for path, mom in moms:
            p = f"{path}." if path else ""
            M = mom.options.num_memories
            k_noisy = self._perturbed(src["k_proj.weight"], M, gen)
            mapped: dict[str, Tensor | None] = {
                "k_mem.weight": k_noisy,
                "v_mem.weight": self._perturbed(src["v_proj.weight"], M, gen),
                "k_mem.bias": _stack(src.get("k_proj.bias"), M) if mom.k_mem.bias is not None else None,
                "v_mem.bias": _stack(src.get("v_proj.bias"), M) if mom.v_mem.bias is not None else None,
                "k_mem_norm.weight": src.get("k_norm.weight") if mom.k_mem_norm is not None else None,
            }
            if mom.g_mem is not None:
                mapped["g_mem.weight"], mapped["g_mem.bias"] = k_noisy, mapped["k_mem.bias"]
            if mom.g_proj is not None:
                mapped["g_proj.weight"], mapped["g_proj.bias"] = src["k_proj.weight"], src.get("k_proj.bias")
            router = torch.randn(mom.router.weight.shape, generator=gen) * self.options.router_std
            mapped["router.weight"] = router.to(mom.router.weight.dtype)
            own = dict(mom.named_parameters())
            for name, t in mapped.items():
                if name not in own:
                    continue
                if t is None:
                    raise ValueError(f"{where}: {p}{name} has no pretrained counterpart (k/v bias or k norm)")
                out[p + name] = t.detach().clone()
        return out

    def _perturbed(self, w: Tensor, num: int, gen: torch.Generator) -> Tensor:
        """``[num, *w.shape]``: ``w`` times ``1 + noise * U(-1, 1)``, independently per memory (exact at noise 0)."""
        stacked = _stack(w, num)
        if self.options.noise == 0:
            return stacked
        u = torch.rand(stacked.shape, generator=gen, dtype=torch.float32) * 2 - 1
        return (stacked.float() * (1 + self.options.noise * u.to(w.device))).to(w.dtype)


def _stack(t: Tensor | None, num: int) -> Tensor | None:
    return None if t is None else t.unsqueeze(0).expand(num, *t.shape).contiguous()


@hookimpl
def surgery_mixers() -> list[type[Mixer]]:
    return [MoM]


@hookimpl
def surgery_weight_maps() -> list[type[WeightMap]]:
    return [MoMFromAttention]
