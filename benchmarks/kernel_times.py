"""GLA kernel benchmark on CUDA: ours vs flash-linear-attention 0.6.0 vs torch SDPA, training and decoding.

Training: Llama-3-8B attention shape (Hq 32, Hkv 8, K = V = 128, bf16), 32K tokens per batch, T = 2K..64K; fwd and
fwd+bwd. fla's chunk_gla has no GQA, so it gets k, v, g repeated to 32 heads; SDPA runs causal with enable_gqa.
Decoding: one token for batch 8; our in-place step vs fla's fused_recurrent_gla vs SDPA over a KV cache of
2K..128K, plain and replayed from a CUDA graph (1 step per graph, and 16 steps per graph = per-step cost once the
graph launch is amortised, as in a captured model step). Also: a correctness check of the settings in use, the
time per kernel of our chunked pipeline (CUDA profiler), the backward with chunk states recomputed (the default) vs
kept (`save_states=True`) and the activation memory each holds, GSA's first pass (value-side gate) on the chunk
kernel vs the fused-recurrent kernel, and Liger attention (Triton vs the PyTorch form).

    python benchmarks/kernel_times.py --out results.json [--sweep] [--quick] [--no-fla]

--sweep times a few launch settings per kernel group first and uses the fastest (recorded under meta).
Prints Markdown tables (date, GPU, torch/triton versions) and writes everything to --out as JSON (also after each
section, so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from surgery.kernels.gla import chunk as ck  # noqa: E402
from surgery.kernels.gla.chunk import chunk_gla_triton  # noqa: E402
from surgery.kernels.gla.fused_recurrent import fused_recurrent_gla_step_, fused_recurrent_gla_triton  # noqa: E402

PEAK_TFLOPS = 775.0  # bf16 dense, measured on this H200 (research/anchor-h200-2026-11-28.json)
PEAK_TBPS = 4.3  # device-to-device copy, bytes read + written
HQ, HKV, D, TOKENS = 32, 8, 128, 32768


def ms(fn: Callable[[], Any]) -> float:
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def randn_cuda(seed: int = 0) -> Callable[..., torch.Tensor]:
    """``rnd(*shape)``: fp32 normal samples on the GPU from one generator seeded ``seed`` (the same inputs per call
    order in every run)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=g)

    return rnd


def inputs(B: int, T: int, grad: bool) -> dict[str, torch.Tensor]:
    rnd, bf = randn_cuda(), torch.bfloat16
    x = {"q": rnd(B, T, HQ, D).to(bf), "k": rnd(B, T, HKV, D).to(bf), "v": rnd(B, T, HKV, D).to(bf),
         "g": (F.logsigmoid(rnd(B, T, HKV, D)) / 16).to(bf), "do": rnd(B, T, HQ, D).to(bf)}
    for n in ("q", "k", "v", "g"):
        x[n].requires_grad_(grad)
    return x


def chunk_flops(B: int, T: int, fwd_only: bool) -> float:
    """Matmul FLOPs of the chunked algorithm (64-token chunks, scores over the whole chunk), fwd or fwd+bwd."""
    C = 64
    per_q = 2 * T * C * D * 2 + 2 * T * D * D  # scores + scores@v, q@state
    per_kv = 2 * T * D * D  # state update
    fwd = B * (HQ * per_q + HKV * per_kv)
    return fwd if fwd_only else fwd * 3.5  # bwd: dA, dq, dk, dv, dh, state recompute ~ 2.5x fwd


def chunk_bytes(B: int, T: int, fwd_only: bool) -> float:
    """Minimal HBM traffic: q, k, v, g read and o written once, bf16; bwd also reads do, writes 4 grads."""
    io = B * T * (2 * HQ * D + 3 * HKV * D) * 2
    return io if fwd_only else io * 3


def sdpa_flops(B: int, T: int, fwd_only: bool) -> float:
    fwd = 4 * B * HQ * T * T * D / 2
    return fwd if fwd_only else fwd * 3.5


def frac(flops: float, nbytes: float, t_ms: float) -> dict[str, float]:
    s = t_ms / 1e3
    return {"tflops": flops / s / 1e12, "frac_flops": flops / s / 1e12 / PEAK_TFLOPS,
            "tbps": nbytes / s / 1e12, "frac_bw": nbytes / s / 1e12 / PEAK_TBPS}


def load_fla() -> tuple[Any, Any, str | None]:
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla

        return chunk_gla, fused_recurrent_gla, None
    except Exception as e:  # noqa: BLE001 - fla is optional here: record why it is missing
        return None, None, err(e)


def bench_train(Ts: list[int], fla_chunk: Any) -> list[dict[str, Any]]:
    rows = []
    for T in Ts:
        B = max(1, TOKENS // T)
        x = inputs(B, T, grad=True)
        row: dict[str, Any] = {"T": T, "B": B}
        scale = D**-0.5

        def ours(save_states: bool = False) -> torch.Tensor:
            return chunk_gla_triton(x["q"], x["k"], x["v"], x["g"], scale=scale, save_states=save_states)[0]

        def ours_fb(save_states: bool = False) -> None:
            torch.autograd.grad(ours(save_states), [x["q"], x["k"], x["v"], x["g"]], x["do"])

        with torch.no_grad():
            row["ours_fwd_ms"] = ms(ours)
        row["ours_fwdbwd_ms"] = ms(ours_fb)  # the default: chunk states recomputed in the backward
        # the other setting: states kept from the forward (faster backward, more activation memory)
        row["ours_fwdbwd_saved_ms"] = ms(lambda: ours_fb(True))
        row["ours_act_mb"] = activation_mb(ours)
        row["ours_act_saved_mb"] = activation_mb(lambda: ours(True))
        row["ours_fwd_frac"] = frac(chunk_flops(B, T, True), chunk_bytes(B, T, True), row["ours_fwd_ms"])
        row["ours_fwdbwd_frac"] = frac(chunk_flops(B, T, False), chunk_bytes(B, T, False), row["ours_fwdbwd_ms"])

        qt, kt, vt = (x[n].transpose(1, 2) for n in ("q", "k", "v"))

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

        try:
            with torch.no_grad():
                row["sdpa_fwd_ms"] = ms(sdpa)
            dot = x["do"].transpose(1, 2)
            row["sdpa_fwdbwd_ms"] = ms(lambda: torch.autograd.grad(sdpa(), [x["q"], x["k"], x["v"]], dot))
            row["sdpa_fwd_frac"] = frac(sdpa_flops(B, T, True), 0, row["sdpa_fwd_ms"])
        except Exception as e:  # noqa: BLE001
            row["sdpa_error"] = err(e)
        if fla_chunk is not None:
            rep = {n: x[n].detach().repeat_interleave(HQ // HKV, dim=2).requires_grad_() for n in ("k", "v", "g")}

            def fla() -> torch.Tensor:
                return fla_chunk(x["q"], rep["k"], rep["v"], rep["g"], scale=scale)[0]

            try:
                with torch.no_grad():
                    row["fla_fwd_ms"] = ms(fla)
                row["fla_fwdbwd_ms"] = ms(lambda: torch.autograd.grad(fla(), [x["q"], rep["k"], rep["v"], rep["g"]],
                                                                      x["do"]))
            except Exception as e:  # noqa: BLE001 - fla refuses its backward on Hopper with Triton < 3.7.1
                row["fla_error"] = err(e)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del x
        torch.cuda.empty_cache()
    return rows


def activation_mb(fwd: Callable[[], torch.Tensor]) -> float:
    """Memory that a forward with autograd leaves allocated for its backward (output included), in MB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = fwd()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    del out
    return held / 2**20


def bench_gsa_pass1(Ts: list[int]) -> list[dict[str, Any]]:
    """GSA's first pass (value-side gate only, M = 64 slots): our chunk kernel vs our fused-recurrent kernel."""
    rows = []
    M = 64
    for T in Ts:
        B = max(1, TOKENS // T)
        rnd, bf = randn_cuda(), torch.bfloat16
        q, k = rnd(B, T, HQ, D).to(bf).requires_grad_(), rnd(B, T, HKV, D).to(bf).requires_grad_()
        s_, gv = rnd(B, T, HKV, M).to(bf).requires_grad_(), (F.logsigmoid(rnd(B, T, HKV, M)) / 8).requires_grad_()
        do = rnd(B, T, HQ, M).to(bf)
        row: dict[str, Any] = {"T": T, "B": B}
        for name, fn in (("chunk", chunk_gla_triton), ("fused_recurrent", fused_recurrent_gla_triton)):
            def fwd(fn: Callable[..., Any] = fn) -> torch.Tensor:
                return fn(q, k, s_, None, gv, 1.0)[0]

            try:
                with torch.no_grad():
                    row[f"{name}_fwd_ms"] = ms(fwd)
                row[f"{name}_fwdbwd_ms"] = ms(lambda fwd=fwd: torch.autograd.grad(fwd(), [q, k, s_, gv], do))
            except Exception as e:  # noqa: BLE001
                row[f"{name}_error"] = err(e)
        rows.append(row)
        print(json.dumps({"gsa_pass1": row}), flush=True)
    return rows


def bench_liger(Ts: list[int], window: int = 64) -> list[dict[str, Any]]:
    """Liger attention (window 64 + GLA) at the training shape: the Triton path vs the PyTorch form, fwd and
    fwd+bwd (compare with the SDPA columns of the training table for full causal attention)."""
    from surgery.kernels.liger import liger_attention

    rows = []
    for T in Ts:
        B = max(1, TOKENS // T)
        rnd, bf = randn_cuda(), torch.bfloat16
        x = {"q_rope": rnd(B, T, HQ, D), "k_rope": rnd(B, T, HKV, D), "q_feat": rnd(B, T, HQ, D).softmax(-1),
             "k_feat": rnd(B, T, HKV, D).softmax(-1), "v": rnd(B, T, HKV, D),
             "gk": F.logsigmoid(rnd(B, T, HKV, D)) / 16}
        x = {n: t.to(bf).requires_grad_() for n, t in x.items()}
        do = rnd(B, T, HQ, D).to(bf)
        row: dict[str, Any] = {"T": T, "B": B}
        for backend in ("triton", "torch"):
            def fwd(backend: str = backend) -> torch.Tensor:
                return liger_attention(*x.values(), window=window, scale=D**-0.5, backend=backend)[0]

            try:
                with torch.no_grad():
                    row[f"{backend}_fwd_ms"] = ms(fwd)
                row[f"{backend}_fwdbwd_ms"] = ms(lambda fwd=fwd: torch.autograd.grad(fwd(), list(x.values()), do))
            except Exception as e:  # noqa: BLE001 - the torch form may run out of memory at long T
                row[f"{backend}_error"] = err(e)
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps({"liger": row}), flush=True)
    return rows


def graph_ms(step: Callable[[], Any], n_steps: int) -> float:
    """Time per step of a CUDA graph holding n_steps calls, replayed many times."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n_steps):
            step()
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 200
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / n_steps


def bench_decode(ctxs: list[int], fla_rec: Any) -> list[dict[str, Any]]:
    B = 8
    gen = torch.Generator(device="cuda").manual_seed(1)
    bf = torch.bfloat16
    q = torch.randn(B, HQ, D, device="cuda", generator=gen).to(bf)
    k = torch.randn(B, HKV, D, device="cuda", generator=gen).to(bf)
    v = torch.randn(B, HKV, D, device="cuda", generator=gen).to(bf)
    g = (F.logsigmoid(torch.randn(B, HKV, D, device="cuda", generator=gen)) / 16).to(bf)
    state = torch.zeros(B, HKV, D, D, device="cuda", dtype=torch.float32)
    out = torch.empty(B, HQ, D, device="cuda", dtype=bf)
    scale = D**-0.5
    common: dict[str, Any] = {"B": B}

    def ours() -> None:
        fused_recurrent_gla_step_(q, k, v, g, state, scale, out=out)

    common["ours_step_ms"] = ms(ours)
    common["ours_graph_1_ms"] = graph_ms(ours, 1)
    common["ours_graph_16_ms"] = graph_ms(ours, 16)
    state_bytes = state.numel() * 4 * 2 + (q.numel() + 3 * k.numel() + out.numel()) * 2
    common["ours_state_bytes_rw"] = state_bytes
    common["ours_graph_16_frac_bw"] = state_bytes / (common["ours_graph_16_ms"] / 1e3) / 1e12 / PEAK_TBPS
    if fla_rec is not None:
        rq, rk, rv, rg = (t[:, None] for t in (q, k, v, g))
        rk, rv, rg = (t.repeat_interleave(HQ // HKV, dim=2) for t in (rk, rv, rg))
        fstate = torch.zeros(B, HQ, D, D, device="cuda", dtype=torch.float32)

        def fla() -> Any:
            return fla_rec(rq, rk, rv, gk=rg, scale=scale, initial_state=fstate, output_final_state=True)

        try:
            common["fla_step_ms"] = ms(fla)
            common["fla_graph_1_ms"] = graph_ms(fla, 1)
        except Exception as e:  # noqa: BLE001
            common["fla_error"] = err(e)
    rows = []
    for ctx in ctxs:
        row = dict(common, context=ctx)
        kc = torch.randn(B, HKV, ctx, D, device="cuda", dtype=bf)
        vc = torch.randn(B, HKV, ctx, D, device="cuda", dtype=bf)
        q4 = q[:, :, None]

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True)

        try:
            row["sdpa_ms"] = ms(sdpa)
            row["sdpa_graph_1_ms"] = graph_ms(sdpa, 1)
            row["kv_cache_bytes"] = kc.numel() * 2 * 2
            row["sdpa_graph_frac_bw"] = row["kv_cache_bytes"] / (row["sdpa_graph_1_ms"] / 1e3) / 1e12 / PEAK_TBPS
        except Exception as e:  # noqa: BLE001
            row["sdpa_error"] = err(e)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del kc, vc
        torch.cuda.empty_cache()
    return rows


def bench_stages(T: int) -> dict[str, Any]:
    """Time per kernel of our chunked pipeline (fwd then bwd) at the training shape, from the CUDA profiler."""
    B = max(1, TOKENS // T)
    x = inputs(B, T, grad=False)
    q, k, v, g, do = x["q"], x["k"], x["v"], x["g"], x["do"]
    out: dict[str, Any] = {"T": T, "B": B}
    out["fwd_ms"] = ms(lambda: ck.chunk_gla_fwd(q, k, v, g, None, D**-0.5, None, False, None))
    out["bwd_ms"] = ms(lambda: ck.chunk_gla_bwd(q, k, v, g, None, D**-0.5, None, None, do, None))
    reps = 5
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                ck.chunk_gla_fwd(q, k, v, g, None, D**-0.5, None, False, None)
                ck.chunk_gla_bwd(q, k, v, g, None, D**-0.5, None, None, do, None)
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
            if t:
                kernels[e.key[:60]] = round(t / reps / 1e3, 4)  # ms per fwd+bwd
        out["kernels_ms"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1]))
    except Exception as e:  # noqa: BLE001 - the profiler may be unavailable in the sandbox
        out["profiler_error"] = err(e)
    print(json.dumps(out), flush=True)
    return out


SWEEP = {
    "fwd": [{"bv_fo": 128, "warps_fo": 4, "stages_fo": 1}, {"bv_fo": 128, "warps_fo": 4, "stages_fo": 2},
            {"bv_fo": 64, "warps_fo": 4, "stages_fo": 2}],
    "state": [{"bk_s": 32, "bv_s": 32, "warps_s": 4, "bk_u": 64, "bv_u": 128, "warps_u": 8},
              {"bk_s": 16, "bv_s": 32, "warps_s": 2, "bk_u": 64, "bv_u": 128, "warps_u": 8},
              {"bk_s": 32, "bv_s": 32, "warps_s": 4, "bk_u": 64, "bv_u": 64, "warps_u": 4}],
    "bwd": [{"bv_fdv": 128, "warps_fdv": 8, "stages_fdv": 1, "bk_fdq": 64, "warps_fdq": 4, "stages_fdq": 1},
            {"bv_fdv": 64, "warps_fdv": 4, "stages_fdv": 2, "bk_fdq": 64, "warps_fdq": 8, "stages_fdq": 2},
            {"bv_fdv": 128, "warps_fdv": 8, "stages_fdv": 1, "bk_fdq": 64, "warps_fdq": 8, "stages_fdq": 1}],
}


def sweep(Ts: list[int]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Time each launch setting (fwd for "fwd", fwd+bwd otherwise), summed over Ts; returns rows and the best
    setting of every group merged into one CONFIG update (CONFIG itself is left as it was)."""
    saved = dict(ck.CONFIG)
    rows: list[dict[str, Any]] = []
    xs = {T: inputs(max(1, TOKENS // T), T, grad=False) for T in Ts}
    best: dict[str, int] = {}
    for group, settings in SWEEP.items():
        scores = []
        for s in settings:
            ck.CONFIG.update(s)
            row: dict[str, Any] = {"group": group, **s}
            total = 0.0
            try:
                for T, x in xs.items():
                    f = ms(lambda: ck.chunk_gla_fwd(x["q"], x["k"], x["v"], x["g"], None, 0.1, None, False, None))
                    row[f"fwd_ms_T{T}"] = f
                    total += f
                    if group != "fwd":
                        bw = ms(lambda: ck.chunk_gla_bwd(x["q"], x["k"], x["v"], x["g"], None, 0.1, None, None,
                                                         x["do"], None))
                        row[f"bwd_ms_T{T}"] = bw
                        total += bw
                scores.append((total, s))
            except Exception as e:  # noqa: BLE001
                row["error"] = err(e)
            ck.CONFIG.clear()
            ck.CONFIG.update(saved)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if scores:
            best.update(min(scores, key=lambda ts: ts[0])[1])
    del xs
    torch.cuda.empty_cache()
    return rows, best


def check(T: int = 2048) -> dict[str, float]:
    """Relative RMSE of our chunked kernels (current CONFIG) against the fp32 token loop, Llama shape, bf16."""
    from surgery.kernels.gla.fused_recurrent import fused_recurrent_gla_triton

    x = inputs(1, T, grad=True)
    names = ("q", "k", "v", "g")
    o, _ = chunk_gla_triton(x["q"], x["k"], x["v"], x["g"], scale=D**-0.5)
    got = [o, *torch.autograd.grad(o, [x[n] for n in names], x["do"])]
    ref_in = [x[n].detach().float().requires_grad_() for n in names]
    o_ref, _ = fused_recurrent_gla_triton(*ref_in, scale=D**-0.5)
    want = [o_ref, *torch.autograd.grad(o_ref, ref_in, x["do"].float())]
    out = {}
    for name, g_, w_ in zip(("o", "dq", "dk", "dv", "dg"), got, want):
        g_, w_ = g_.double(), w_.double()
        out[name] = ((g_ - w_).pow(2).mean().sqrt() / w_.pow(2).mean().sqrt()).item()
    print(json.dumps({"check_rel_rmse": out}), flush=True)
    return out


def table(title: str, rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            val = r.get(c, "")
            if isinstance(val, dict):
                val = f"{val['frac_flops']:.2f}F/{val['frac_bw']:.2f}B"
            cells.append(f"{val:.4f}" if isinstance(val, float) else str(val))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gla_bench.json")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch settings")
    ap.add_argument("--no-fla", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_times.py needs a CUDA device")
    Ts = [2048, 32768] if args.quick else [2048, 4096, 8192, 16384, 32768, 65536]
    ctxs = [2048, 131072] if args.quick else [2048, 8192, 32768, 131072]
    fla_chunk, fla_rec, fla_err = (None, None, "skipped") if args.no_fla else load_fla()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "fla_import_error": fla_err, "config_chunk": dict(ck.CONFIG),
            "shape": {"Hq": HQ, "Hkv": HKV, "K": D, "V": D, "tokens": TOKENS, "dtype": "bf16"},
            "ceilings": {"tflops": PEAK_TFLOPS, "tbps": PEAK_TBPS}}
    try:
        import fla

        meta["fla"] = fla.__version__
    except Exception:  # noqa: BLE001
        meta["fla"] = None
    result: dict[str, Any] = {"meta": meta}

    def save() -> None:
        Path(args.out).write_text(json.dumps(result, indent=1))

    if args.sweep:
        result["sweep"], best = sweep([2048, 32768])
        ck.CONFIG.update(best)
        meta["config_chunk"] = dict(ck.CONFIG)
        print(json.dumps({"chosen_config": best}), flush=True)
        save()
    result["check"] = check()
    result["stages"] = [bench_stages(T) for T in (2048, 32768)]
    save()
    result["train"] = bench_train(Ts, fla_chunk)
    save()
    result["gsa_pass1"] = bench_gsa_pass1([2048, 32768] if args.quick else [2048, 8192, 32768])
    save()
    result["liger"] = bench_liger([2048, 32768] if args.quick else [2048, 8192, 32768])
    save()
    result["decode"] = bench_decode(ctxs, fla_rec)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n## GLA kernels, {meta['date']}, {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
          f"fla {meta['fla']}\n")
    print(table("Training, 32K tokens/batch, Hq 32 / Hkv 8, K=V=128, bf16 (ms; frac = of 775 TFLOP/s / 4.3 TB/s)",
                result["train"], ["T", "B", "ours_fwd_ms", "ours_fwdbwd_ms", "ours_fwd_frac", "ours_fwdbwd_frac",
                                  "fla_fwd_ms", "fla_fwdbwd_ms", "sdpa_fwd_ms", "sdpa_fwdbwd_ms"]))
    print()
    print(table("Backward: chunk states recomputed (default) vs kept from the forward (ms; activation MB held "
                "for the backward, output included)", result["train"],
                ["T", "B", "ours_fwdbwd_ms", "ours_fwdbwd_saved_ms", "ours_act_mb", "ours_act_saved_mb"]))
    print()
    print(table("GSA pass 1 (value-side gate, M = 64 slots), bf16 (ms)", result["gsa_pass1"],
                ["T", "B", "chunk_fwd_ms", "chunk_fwdbwd_ms", "fused_recurrent_fwd_ms",
                 "fused_recurrent_fwdbwd_ms"]))
    print()
    print(table("Liger attention (window 64 + GLA), bf16 (ms)", result["liger"],
                ["T", "B", "triton_fwd_ms", "triton_fwdbwd_ms", "torch_fwd_ms", "torch_fwdbwd_ms", "torch_error"]))
    errs = {r.get("fla_error") for r in result["train"]} - {None}
    if errs:
        print("\nfla errors: " + "; ".join(sorted(errs)))
    print()
    print(table("Decode, one token, batch 8 (ms)", result["decode"],
                ["context", "ours_step_ms", "ours_graph_1_ms", "ours_graph_16_ms", "ours_graph_16_frac_bw",
                 "fla_step_ms", "fla_graph_1_ms", "sdpa_ms", "sdpa_graph_1_ms", "sdpa_graph_frac_bw"]))
    print()
    for st in result["stages"]:
        print(f"\nOur kernels at T={st['T']} B={st['B']}: fwd {st['fwd_ms']:.3f} ms, bwd {st['bwd_ms']:.3f} ms; "
              f"per kernel (ms per fwd+bwd): {json.dumps(st.get('kernels_ms', st.get('profiler_error')))}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
