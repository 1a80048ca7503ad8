"""The ``mom`` mixer and ``mom_from_attention``: routing, bucketed dispatch, the M = 1 reduction, decoding, padding.

The dispatch is checked against a reference that loops over memories: memory m run on the whole sequence with every
token not routed to it made an identity step (``valid`` False), which is what "memory m sees only its tokens" means.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from transformers import DynamicCache

import surgery
from surgery.cache import MixerCacheLayer
from surgery.plan import PlanError
from surgery.plugins.gla import GLA
from surgery.plugins.mom import MemoryLinear, MoM
from surgery.plugins.mom_dispatch import Routing, dense_rows, dispatch, load_balancing_loss, route, take_rows
from surgery.plugins.mom_dispatch import pack, tokens_per_memory
from surgery.sites.attention import find_attention
from tests.models import tiny_model

TOL = dict(rtol=1e-4, atol=2e-5)


pytestmark = pytest.mark.usefixtures("one_thread")


def convert(arch: str, mixer: str, options: dict[str, Any], registry: Any, weights: str | None = None,
            weight_options: dict[str, Any] | None = None, **kw: Any) -> Any:  # fmt: skip
    rule: dict[str, Any] = {"layers": "all", "mixer": mixer, "options": options}
    if weights is not None:
        rule["weights"] = weights
    if weight_options is not None:
        rule["weight_options"] = weight_options
    plan = {"version": 2, "model": "unused/hub-id", "convert": [rule]}
    return surgery.convert(surgery.load_plan(plan, registry), tiny_model(arch, **kw))


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


def moms(model: Any) -> list[MoM]:
    return [m for m in model.modules() if isinstance(m, MoM)]


# -- routing ----------------------------------------------------------------------------------------------------


def test_routing_invariants() -> None:
    logits = torch.randn(3, 11, 5, generator=torch.Generator().manual_seed(0))
    r = route(logits, 2)
    assert r.experts.shape == (3, 11, 2) and r.weights.dtype == torch.float32
    assert (r.experts[..., 0] != r.experts[..., 1]).all()  # exactly k distinct memories per token
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(3, 11))
    assert (r.weights > 0).all()
    counts = tokens_per_memory(r, None, 5)
    assert counts.sum() == 3 * 11 * 2
    aux = load_balancing_loss(r, None, counts)
    assert torch.isfinite(aux) and aux >= 1 - 1e-6


@pytest.mark.parametrize("kind", ["selection", "permutation"])
def test_take_rows_matches_index_select_and_its_gradient(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, 2, generator=gen, requires_grad=True)
    index = torch.randperm(9, generator=gen)[: 5 if kind == "selection" else 9]
    g = torch.randn(len(index), 3, 2, generator=gen)
    ours = take_rows(x, index)
    (ours * g).sum().backward()
    grad, x.grad = x.grad, None
    ref = x.index_select(0, index)
    (ref * g).sum().backward()
    assert torch.equal(ours, ref) and torch.equal(grad, x.grad)


def test_load_balancing_loss_is_one_when_uniform_and_m_when_collapsed() -> None:
    uniform = route(torch.zeros(2, 9, 4), 2)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False
    for v in (None, valid):
        aux = load_balancing_loss(uniform, v, tokens_per_memory(uniform, v, 4))
        torch.testing.assert_close(aux, torch.tensor(1.0))
    collapsed = route(torch.tensor([50.0, 0, 0, 0]).expand(2, 9, 4), 1)
    aux = load_balancing_loss(collapsed, None, tokens_per_memory(collapsed, None, 4))
    torch.testing.assert_close(aux, torch.tensor(4.0), rtol=1e-4, atol=1e-4)
    # Padded tokens route nowhere: they are not counted.
    assert tokens_per_memory(uniform, valid, 4).sum() == valid.sum() * 2


# -- dispatch against a per-memory masked reference ---------------------------------------------------------------


def _masked_reference(recur: Any, q, keys, values, routing: Routing, valid, state):  # noqa: ANN001, ANN202
    M = keys.shape[2]
    out, finals = 0.0, []
    for m in range(M):
        chosen = routing.experts == m  # [B, T, k]
        mine = chosen.any(-1) if valid is None else chosen.any(-1) & valid
        init = None if state is None else tuple(s[:, m] for s in state)
        o, s = recur(q, keys[:, :, m], values[:, :, m], keys[:, :, m], mine, init, True)
        out = out + (routing.weights * chosen).sum(-1)[..., None, None] * o
        finals.append(s)
    return out, tuple(torch.stack([f[i] for f in finals], 1) for i in range(len(finals[0])))


@pytest.mark.parametrize("T", [13, 1], ids=["varlen", "decode-step"])
@pytest.mark.parametrize("padded", [False, True])
def test_dispatch_equals_masked_reference(T: int, padded: bool, registry: Any) -> None:
    """Bucketed dispatch == one masked recurrence per memory, outputs, final states and gradients."""
    site = find_attention(tiny_model("llama"))[0]
    cell = GLA(site, GLA.Options(), None, projections=False)
    B, M, k, Hq, Hkv, D = 3, 4, 2, 4, 2, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, Hq, D, generator=g, requires_grad=True)
    keys = torch.randn(B, T, M, Hkv, D, generator=g, requires_grad=True)
    values = torch.randn(B, T, M, Hkv, D, generator=g, requires_grad=True)
    logits = torch.randn(B, T, M, generator=g, requires_grad=True)
    state = (torch.randn(B, M, Hkv, D, D, generator=g) * 0.1,)
    valid = None
    if padded:
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[1, : max(T - 1, 1) // 2] = False
        if T == 1:
            valid[2, 0] = False
    routing = route(logits, k)
    got, got_state = dispatch(cell.recur, q, dense_rows(keys, values, None), routing, valid, state, True)
    ref, ref_state = _masked_reference(cell.recur, q, keys, values, routing, valid, state)
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(got_state[0], ref_state[0], **TOL)
    probe = torch.randn(got.shape, generator=g)
    grads = torch.autograd.grad((got * probe).sum() + got_state[0].sum(), (q, keys, values, logits), retain_graph=True)
    ref_grads = torch.autograd.grad((ref * probe).sum() + ref_state[0].sum(), (q, keys, values, logits))
    for name, a, b in zip(("q", "keys", "values", "router logits"), grads, ref_grads):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, **TOL, msg=name)


@pytest.mark.parametrize("piece,backend", [(64, "torch"), (7, "torch"), (1, "torch"), (7, "triton")])
def test_dispatch_in_pieces_equals_one_call(piece: int, backend: str, registry: Any) -> None:
    """The packed rows walked ``piece`` at a time (segments cut mid-chunk continue from the previous piece's state,
    segments a piece does not reach keep theirs) == one recurrence over all of them: outputs, states, gradients.
    ``triton``: the chunk kernel in the interpreter, clipped ``cu_seqlens`` with empty segments included."""
    from surgery.kernels.gla import chunk_gla

    site = find_attention(tiny_model("llama"))[0]
    cell = GLA(site, GLA.Options(), None, projections=False)

    def recur(q, k, v, gate, valid, state, want_state, cu_seqlens=None):  # noqa: ANN001, ANN202
        fq, fk, fv, gk, _ = cell.gla_form(q, k, v, gate, valid)
        o, s = chunk_gla(fq, fk, fv, gk, None, 1.0, state[0] if state else None, want_state, cu_seqlens,
                         backend=backend)  # fmt: skip
        return o, ((s,) if want_state else None)

    B, T, M, k, Hq, Hkv, D = 2, 23, 3, 2, 4, 2, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, T, Hq, D, generator=g, requires_grad=True)
    keys = torch.randn(B, T, M, Hkv, D, generator=g, requires_grad=True)
    values = torch.randn(B, T, M, Hkv, D, generator=g, requires_grad=True)
    logits = torch.randn(B, T, M, generator=g, requires_grad=True)
    state = (torch.randn(B, M, Hkv, D, D, generator=g) * 0.1,)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False
    routing = route(logits, k)
    got, got_state = dispatch(recur, q, dense_rows(keys, values, None), routing, valid, state, True, piece=piece)
    ref, ref_state = dispatch(recur, q, dense_rows(keys, values, None), routing, valid, state, True, piece=B * T * k)
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(got_state[0], ref_state[0], **TOL)
    probe = torch.randn(got.shape, generator=g)
    grads = torch.autograd.grad((got * probe).sum() + got_state[0].sum(), (q, keys, values, logits),
                                retain_graph=True)  # fmt: skip
    ref_grads = torch.autograd.grad((ref * probe).sum() + ref_state[0].sum(), (q, keys, values, logits))
    for name, a, b in zip(("q", "keys", "values", "router logits"), grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL, msg=name)


def _largest_new_tensor(fn: Any) -> tuple[int, list[int]]:
    """Run ``fn``; the bytes of the largest tensor any op allocated (views excluded), and every recurrence call's
    row count (the T of each GLA kernel call)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    import surgery.recurrent as recurrent_mod

    class Largest(TorchDispatchMode):
        size = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            seen = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    self.size = max(self.size, t.untyped_storage().nbytes())
            return out

    calls: list[int] = []
    real = recurrent_mod.run_gla

    def counting(q, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(q.shape[1])
        return real(q, *args, **kwargs)

    recurrent_mod.run_gla = counting
    try:
        with Largest() as mode:
            fn()
    finally:
        recurrent_mod.run_gla = real
    return mode.size, calls


@pytest.mark.parametrize("training", [False, True], ids=["prefill", "training"])
def test_no_tensor_is_per_memory_at_full_length(training: bool, registry: Any) -> None:
    """MoM (8 memories, top 2, shared memory) on T tokens: no recurrence call runs more rows than the tokens, and
    the largest tensor created (forward, and backward in training) is at most 1.5x GLA's at the same shape: nothing
    is ``[M, T, ...]`` or ``[k, T, ...]`` (one recurrence over all ``k * T`` routed rows was 2x, a dense projection of
    every memory ``M / 2``x the key)."""
    B, T = 2, 192
    sizes = {}
    for name, options in (("gla", {}), ("mom", {"num_memories": 8, "topk": 2})):
        model = convert("llama", name, options, registry)
        layer = model.model.layers[0].self_attn
        layer.train(training)
        layer.recompute = False
        x = torch.randn(B, T, model.config.hidden_size, requires_grad=training)
        ctx = __import__("surgery.mixer", fromlist=["MixContext"]).MixContext(None, None, None, None, {})

        def run() -> None:
            with torch.set_grad_enabled(training):
                y = layer.mix(x, ctx)
                if training:
                    y.float().square().mean().backward()

        sizes[name], calls = _largest_new_tensor(run)
        assert max(calls) <= B * T, (name, calls)
    assert sizes["mom"] <= 1.5 * sizes["gla"], sizes


@pytest.mark.parametrize("arch,options", [("qwen2", {}), ("qwen3", {"gate": "projection"})],
                         ids=["bias", "k-norm-gate-projection"])
@pytest.mark.parametrize("T", [9, 1], ids=["prefill", "decode-step"])
def test_grouped_projection_equals_every_memory_then_select(arch: str, options: dict, T: int, registry: Any) -> None:
    """Projecting only the routed rows (grouped GEMM) == projecting every memory and selecting, values and grads."""
    mom = moms(convert(arch, "mom", options, registry, weight_options={"noise": 0.2}))[0]
    assert mom.k_mem.bias is not None or mom.k_mem_norm is not None
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, T, mom.site.dims.hidden_size, generator=g, requires_grad=True)
    packing, _ = pack(route(torch.randn(2, T, 4, generator=g), 2).experts, 4)
    assert mom.k_mem.grouped(x)
    got = mom.memory_rows(x)(packing)
    ref = dense_rows(*mom.memories(x))(packing)
    assert got[2] is not None if options else got[2] is None
    params = [x, *(p for p in mom.parameters() if p.requires_grad and p is not mom.router.weight)]
    probes = [torch.randn(r.shape, generator=g) for r in ref if r is not None]
    grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(got, probes)), params, allow_unused=True)
    ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, probes)), params, allow_unused=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL)


def test_grouped_projection_is_refused_where_no_grouped_kernel_runs(registry: Any) -> None:
    """float64, and rows whose width is not 16 bytes, take the dense form (the grouped op refuses them)."""
    mom = moms(convert("llama", "mom", {}, registry))[0]
    C = mom.site.dims.hidden_size
    assert mom.k_mem.grouped(torch.zeros(1, C))
    assert not mom.k_mem.grouped(torch.zeros(1, C, dtype=torch.float64))
    odd = MemoryLinear(2, 6, 8, bias=False)
    assert not odd.grouped(torch.zeros(1, 6))


@pytest.mark.gpu
def test_cuda_bf16_model_equals_its_fp32_cpu_form(registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA in bf16 (grouped projection, varlen Triton recurrence): the loss and the router/memory gradients
    follow the fp32 CPU model, and dense selection gives the same loss as the grouped projection."""
    torch.manual_seed(0)
    cpu = convert("llama", "mom", {}, registry, weight_options={"noise": 0.1}, hidden_size=256, head_dim=64,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    gpu = copy.deepcopy(cpu).to("cuda", torch.bfloat16).train()
    x = ids(2, 200, seed=5)
    mom = moms(gpu)[0]
    assert mom.k_mem.grouped(torch.zeros(1, 256, device="cuda", dtype=torch.bfloat16))
    cpu.train()
    losses, grads = [], []
    for model, inp in ((cpu, x), (gpu, x.cuda())):
        loss = model(inp, labels=inp, use_cache=False).loss
        loss.backward()
        losses.append(loss.float().item())
        grads.append([moms(model)[0].router.weight.grad.float().cpu(), moms(model)[0].v_mem.weight.grad.float().cpu()])
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[0])
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        assert (a - b).norm() <= 0.1 * a.norm()
    monkeypatch.setattr(MemoryLinear, "grouped", lambda self, x: False)
    with torch.no_grad():
        dense = gpu(x.cuda(), labels=x.cuda(), use_cache=False).loss.float().item()
    assert abs(dense - losses[1]) < 1e-2 * abs(losses[1])


def test_decode_step_touches_only_the_chosen_memories(registry: Any) -> None:
    site = find_attention(tiny_model("llama"))[0]
    cell = GLA(site, GLA.Options(), None, projections=False)
    B, M, Hkv, D = 2, 4, 2, 16
    g = torch.Generator().manual_seed(2)
    q, keys, values = torch.randn(B, 1, 4, D, generator=g), torch.randn(B, 1, M, Hkv, D, generator=g), \
        torch.randn(B, 1, M, Hkv, D, generator=g)  # fmt: skip
    routing = route(torch.randn(B, 1, M, generator=g), 2)
    before = torch.randn(B, M, Hkv, D, D, generator=g)
    with torch.no_grad():
        _, (after,) = dispatch(cell.recur, q, dense_rows(keys, values, None), routing, None, (before.clone(),), True)
    for b in range(B):
        for m in range(M):
            changed = not torch.equal(after[b, m], before[b, m])
            assert changed == (m in routing.experts[b, 0].tolist()), (b, m)


# -- in converted models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_one_memory_without_sharing_is_gla(arch: str, registry: Any) -> None:
    """M = 1, k = 1, no shared memory, no noise: exactly the ``gla`` conversion (keys, biases, k norm, padding)."""
    x = ids(2, 21, seed=3)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    gla = convert(arch, "gla", {}, registry)
    mom = convert(arch, "mom", {"num_memories": 1, "topk": 1, "shared_memory": False}, registry)
    with torch.no_grad():
        torch.testing.assert_close(mom(x, attention_mask=mask).logits, gla(x, attention_mask=mask).logits, **TOL)


OPTIONS = [
    ("default", {}),
    ("gsa-projection", {"num_memories": 3, "recurrent": {"mixer": "gsa", "options": {"num_slots": 4}},
                        "gate": "projection"}),  # fmt: skip
]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("name,options", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_cached_decoding_equals_full_forward(arch: str, name: str, options: dict, registry: Any) -> None:
    """Prefill, a 4-token chunk, then token-by-token decoding == one forward; the cache layout and its size."""
    model = convert(arch, "mom", options, registry, weight_options={"noise": 0.1})
    x = ids(2, 17)
    cache = DynamicCache(config=model.config)
    sizes = []
    with torch.no_grad():
        full = model(x).logits
        parts = [model(x[:, :6], cache=cache, use_cache=True).logits]
        parts.append(model(x[:, 6:10], cache=cache, use_cache=True).logits)
        for t in range(10, 17):
            parts.append(model(x[:, t : t + 1], cache=cache, use_cache=True).logits)
            sizes.append(sum(s.numel() for layer in cache.layers for s in layer.states))
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)
    assert len(set(sizes)) == 1
    dims = find_attention(tiny_model(arch))[0].dims
    M, hkv, d = options.get("num_memories", 4), dims.num_kv_heads, dims.head_dim
    for layer in cache.layers:
        assert isinstance(layer, MixerCacheLayer) and layer.seen == 17
        if name == "default":
            assert [tuple(s.shape) for s in layer.states] == [(2, M, hkv, d, d), (2, hkv, d, d)]
        else:
            assert [tuple(s.shape) for s in layer.states] == [(2, M, hkv, d, 4), (2, M, hkv, 4, d),
                                                              (2, hkv, d, 4), (2, hkv, 4, d)]  # fmt: skip


def _greedy_by_full_forwards(model: Any, x: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


@pytest.mark.parametrize(
    "mixer,options",
    [("mom", {}), ("liger_attention", {"window": 4, "recurrent": {"mixer": "mom", "options": {"num_memories": 3}}})],
    ids=["mom", "liger-mom"],
)
def test_generate_left_padding_and_batching(mixer: str, options: dict, registry: Any) -> None:
    """greedy generate() == argmax of full forwards; a left-padded batch == each row on its own."""
    model = convert("llama", mixer, options, registry, weights="mom_from_attention", weight_options={"noise": 0.1})
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    a, b = ids(1, 9, seed=1), ids(1, 4, seed=2)
    with torch.no_grad():
        out_a = model.generate(a, **gen, output_logits=True, return_dict_in_generate=True)
        out_b = model.generate(b, **gen, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(out_a.sequences, _greedy_by_full_forwards(model, a, 6))
        batch = torch.cat([a, torch.cat([ids(1, 5, seed=9), b], 1)])
        mask = torch.ones_like(batch)
        mask[1, :5] = 0
        out = model.generate(batch, attention_mask=mask, **gen, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences[0], out_a.sequences[0])
    assert torch.equal(out.sequences[1, 5:], out_b.sequences[0])
    for step, (both, row_a, row_b) in enumerate(zip(out.logits, out_a.logits, out_b.logits)):
        torch.testing.assert_close(both[0], row_a[0], **TOL, msg=f"row 0, step {step}")
        torch.testing.assert_close(both[1], row_b[0], **TOL, msg=f"row 1, step {step}")


def test_liger_attention_over_mom_decodes_exactly(registry: Any) -> None:
    opts = {"window": 3, "recurrent": {"mixer": "mom", "options": {"num_memories": 2, "topk": 1}}}
    model = convert("qwen3", "liger_attention", opts, registry, weights="mom_from_attention")
    rec = model.surgery.manifest[0]
    assert "recurrent.k_mem.weight" in rec.reshaped and "recurrent.k_mem_norm.weight" in rec.reshaped
    layer = model.model.layers[0].self_attn
    assert isinstance(layer.recurrent, MoM) and not hasattr(layer.recurrent, "k_proj")
    x = ids(2, 12, seed=4)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(x).logits
        parts = [model(x[:, :5], cache=cache, use_cache=True).logits]
        parts += [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)
    # mom's own knobs beside liger's (the old short form) are an error that says where they go.
    with pytest.raises(PlanError, match=r"convert.0.options.num_memories: unknown key 'num_memories': an option of "
                                        r"the recurrent branch goes under recurrent"):  # fmt: skip
        convert("llama", "liger_attention", {"window": 3, "recurrent": "mom", "num_memories": 2}, registry,
                weights="mom_from_attention")


def test_gradients_and_aux_loss(registry: Any) -> None:
    """A training step reaches the router and every memory's projections; the aux loss is set, scaled, finite."""
    model = convert("qwen2", "mom", {"gate": "projection", "aux_loss_scale": 0.01}, registry).train()
    x = ids(2, 24)
    loss = model(x, labels=x).loss
    aux = [m.aux_loss for m in moms(model)]
    assert all(a is not None and torch.isfinite(a) and a >= 0.01 * (1 - 1e-4) for a in aux)
    (loss + sum(aux)).backward()
    for m in moms(model):
        for name in ("router.weight", "k_mem.weight", "v_mem.weight", "k_mem.bias", "g_mem.weight", "q_proj.weight",
                     "k_proj.weight", "g_proj.weight", "o_proj.weight"):  # fmt: skip
            grad = m.get_parameter(name).grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (m.layer_idx, name)
    model.eval()
    for m in moms(model):
        m.aux_loss = None
    with torch.no_grad():
        model(x)
    assert all(m.aux_loss is None for m in moms(model))  # only training forwards set it


def test_routing_stats_and_state_dict(registry: Any) -> None:
    model = convert("llama", "mom", {"num_memories": 3}, registry)
    for m in moms(model):
        m.reset_stats()
    x = ids(2, 10)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    with torch.no_grad():
        model(x, attention_mask=mask)
    for m in moms(model):
        counts = m.stats()["tokens_per_memory"]
        assert len(counts) == 3 and sum(counts) == (20 - 4) * 2
        assert "token_counts" not in m.state_dict()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_recovery_reports_tokens_per_memory(checkpointing: bool, registry: Any, tmp_path: Any) -> None:
    """Every (token, choice) pair of a stage is counted once per layer, a recomputed forward not again."""
    from surgery.recovery import recover
    from tests.test_recover import char_tokenizer, make_spec, write_data

    model = convert("llama", "mom", {"num_memories": 3, "topk": 2}, registry)
    spec = make_spec(write_data(tmp_path / "data.jsonl"), max_steps=3, batch_size=2,
                     gradient_checkpointing=checkpointing)  # fmt: skip
    result = recover(model, spec=spec, tokenizer=char_tokenizer(), out=tmp_path / "run")
    stats = result.stages["lora"].extra["mixer_stats"]
    assert sorted(stats) == [f"layer {i} mom" for i in range(model.config.num_hidden_layers)]
    for layer in stats.values():
        assert len(layer["tokens_per_memory"]) == 3
        assert sum(layer["tokens_per_memory"]) == 3 * 2 * 64 * 2  # steps x batch x seq_len x k
    saved = json.loads((tmp_path / "run" / "lora" / "done.json").read_text())
    assert saved["extra"]["mixer_stats"] == stats  # a reloaded stage reports the same


def test_weight_map(registry: Any) -> None:
    base = tiny_model("qwen2")
    src = base.model.layers[1].self_attn
    model = convert("qwen2", "mom", {}, registry, weight_options={"noise": 0.05, "seed": 7})
    m = model.model.layers[1].self_attn
    assert torch.equal(m.k_proj.weight, src.k_proj.weight) and torch.equal(m.v_proj.bias, src.v_proj.bias)
    w = m.k_mem.weight
    assert not torch.equal(w[0], w[1])  # memories differ, so they can specialise
    rel = (w - src.k_proj.weight).abs() / src.k_proj.weight.abs().clamp(min=1e-12)
    assert rel.max() <= 0.05 + 1e-6
    assert torch.equal(m.k_mem.bias, src.k_proj.bias.expand(4, -1))
    assert m.router.weight.abs().max() < 0.01  # near-uniform routing at the start
    again = convert("qwen2", "mom", {}, registry, weight_options={"noise": 0.05, "seed": 7})
    assert torch.equal(again.model.layers[1].self_attn.k_mem.weight, w)
    exact = convert("qwen2", "mom", {}, registry).model.layers[1].self_attn
    assert torch.equal(exact.v_mem.weight, src.v_proj.weight.expand(4, -1, -1))
    with pytest.raises(PlanError, match="router"):
        convert("llama", "gla", {}, registry, weights="mom_from_attention")


@pytest.mark.parametrize(
    "options,match",
    [
        ({"num_memories": 2, "topk": 3}, "topk=3 must not exceed num_memories=2"),
        ({"recurrent": "softmax"}, r"convert.0.options.recurrent.mixer: 'softmax' is a mixer but not a recurrent mixer"),
        ({"recurrent": "mom"}, "cannot be its own memory"),
        ({"recurrent": {"mixer": "gla", "options": {"gate": "projection"}}}, "set 'gate' on mom itself"),
        ({"recurrent": {"mixer": "gsa", "options": {"num_slot": 4}}},
         r"convert.0.options.recurrent.options.num_slot: unknown key 'num_slot'; did you mean 'num_slots'"),
        # the old spelling names the new one, at the old key's location
        ({"recurrence": "gsa"}, r"convert.0.options.recurrence: recurrence is no longer a key: write recurrent: "
                                r"\{mixer: NAME, options: \{...\}\}"),
        ({"recurrence_options": {}}, r"convert.0.options.recurrence_options: recurrence_options is no longer a key"),
    ],
)
def test_option_errors(options: dict, match: str, registry: Any) -> None:
    plan = {"version": 2, "model": "unused/hub-id", "convert": [{"layers": "all", "mixer": "mom", "options": options}]}
    with pytest.raises(Exception, match=match):
        surgery.load_plan(plan, registry)


def test_gsa_slots_that_do_not_divide_the_head_dim_are_located(registry: Any) -> None:
    with pytest.raises(PlanError, match="num_slots=5 must divide head_dim"):
        convert("llama", "mom", {"recurrent": {"mixer": "gsa", "options": {"num_slots": 5}}}, registry)


def test_liger_over_mom_saves_and_loads(registry: Any, tmp_path: Any) -> None:
    """The stored plan (mom's options nested in liger's, the recurrence's options inside mom's) rebuilds the model."""
    opts = {"window": 3, "recurrent": {"mixer": "mom", "options": {"num_memories": 3, "recurrent": "hgrn2"}}}
    model = convert("llama", "liger_attention", opts, registry, weights="mom_from_attention",
                    weight_options={"noise": 0.1})  # fmt: skip
    surgery.save(model, tmp_path / "m")
    loaded = surgery.load(tmp_path / "m")
    x = ids(2, 9, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert loaded.model.layers[0].self_attn.recurrent.options.recurrent.mixer == "hgrn2"


def test_liger_over_mom_defaults_to_moms_weight_map(registry: Any) -> None:
    """A Liger rule with a mom branch and no weights gets mom_from_attention (the branch's own default), so the
    memories start from the pretrained k/v instead of at random."""
    import surgery

    rule = {"mixer": "liger_attention", "options": {"window": 4, "recurrent": {"mixer": "mom"}}}
    plan = surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [rule]}, registry)
    assert plan.convert[0].weights == "mom_from_attention"
    assert surgery.load_plan({"version": 2, "model": "unused/hub-id", "convert": [{"mixer": "liger_attention"}]},
                             registry).convert[0].weights == "copy_qkvo"  # fmt: skip
