"""Compile every Triton kernel of ``surgery.kernels`` for an H100/H200 (sm_90) on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, not whether they compile: it accepts
things the compiler rejects (a plain global read inside a kernel, dot shapes under 16, mixed dtypes in a dot) and
knows nothing of shared memory. Here a stand-in driver reports an sm_90 target and turns launches into no-ops, so
the real launchers (``chunk_gla_fwd``/``chunk_gla_bwd``, the sliding-window autograd Function, the fused-recurrent
kernels, the Liger decode step) run on CPU tensors and every kernel they launch goes through Triton's full pipeline down to ptxas, with
the shared-memory limit of an H200 checked. Outputs are garbage (nothing runs); only compilation is tested.

    python -m tests.kernels.sm90_compile            # from the repository root; TRITON_INTERPRET must be unset

``tests/kernels/test_sm90_compile.py`` runs it in a subprocess when ``SURGERY_SM90_COMPILE=1``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: this check compiles the kernels for real")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

H200_SHARED = 232448  # bytes of shared memory per block (opt-in maximum) on sm_90


class _Utils:
    """What CompiledKernel asks of a driver's utils: properties and a (skipped) binary load."""

    def get_device_properties(self, device: int) -> dict[str, int]:
        return {"max_shared_mem": H200_SHARED, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple[Any, Any, int, int, int]:
        return None, None, 0, 0, 1024


class CompileOnlyDriver(DriverBase):
    """A CUDA sm_90 target whose launches do nothing."""

    def __init__(self, arch: int = 90) -> None:
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils()

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self) -> Any:
        raise RuntimeError("no benchmarking without a GPU")

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def launcher_cls(self, src: Any, metadata: Any) -> Any:
        return lambda *args, **kwargs: None


def _gla_case(dtype: torch.dtype, Hq: int, Hkv: int, K: int, V: int, gv: bool, varlen: bool) -> None:
    from surgery.kernels.gla.chunk_bwd import chunk_gla_bwd
    from surgery.kernels.gla.chunk_fwd import chunk_gla_fwd

    B, T = (1, 200) if varlen else (2, 130)
    q = torch.randn(B, T, Hq, K).to(dtype)
    k = torch.randn(B, T, Hkv, K).to(dtype)
    v = torch.randn(B, T, Hkv, V).to(dtype)
    gk = F.logsigmoid(torch.randn(B, T, Hkv, K))
    g_v = F.logsigmoid(torch.randn(B, T, Hkv, V)) if gv else None
    cu = torch.tensor([0, 7, 7, 200]) if varlen else None
    N = 3 if varlen else B
    h0 = torch.randn(N, Hkv, K, V)
    o, ht, b, bv, h = chunk_gla_fwd(q, k, v, gk, g_v, 0.5, h0, True, cu)
    do = torch.randn_like(o)
    chunk_gla_bwd(q, k, v, gk, g_v, 0.5, h0, cu, do, torch.randn_like(ht), None, None, None)
    chunk_gla_bwd(q, k, v, gk, g_v, 0.5, h0, cu, do, None, b, bv, h)


def _swa_case(dtype: torch.dtype, Hq: int, Hkv: int, D: int, softcap: float | None, residual: bool) -> None:
    from surgery.kernels.liger.swa_triton import SlidingWindowAttentionFunction

    B, T = 1, 150
    q = torch.randn(B, T, Hq, D).to(dtype).requires_grad_()
    k = torch.randn(B, T, Hkv, D).to(dtype).requires_grad_()
    v = torch.randn(B, T, Hkv, D).to(dtype).requires_grad_()
    res = torch.randn(B, T, Hq, D).to(dtype).requires_grad_() if residual else None
    o = SlidingWindowAttentionFunction.apply(q, k, v, res, 64, D**-0.5, softcap, 0.5)
    torch.autograd.grad(o, [q, k, v], torch.randn_like(o))


def _recurrent_case(dtype: torch.dtype) -> None:
    from surgery.kernels.gla.fused_recurrent import FusedRecurrentGLAFunction, fused_recurrent_gla_step_

    B, T, Hq, Hkv, D = 2, 9, 4, 1, 128
    x = [torch.randn(B, T, h, D).to(dtype).requires_grad_() for h in (Hq, Hkv, Hkv)]
    gk = F.logsigmoid(torch.randn(B, T, Hkv, D)).requires_grad_()
    gv = F.logsigmoid(torch.randn(B, T, Hkv, D)).requires_grad_()
    o, _ = FusedRecurrentGLAFunction.apply(*x, gk, gv, 0.5, torch.randn(B, Hkv, D, D), True, None)
    torch.autograd.grad(o, [*x, gk, gv], torch.randn_like(o))
    fused_recurrent_gla_step_(x[0][:, 0].detach(), x[1][:, 0].detach(), x[2][:, 0].detach(), gk[:, 0].detach(),
                              torch.zeros(B, Hkv, D, D), 0.5)


def _decode_case(dtype: torch.dtype, rope: bool) -> None:
    from surgery.kernels.liger.decode import window_decode

    B, Hq, Hkv, W, D = 8, 32, 8, 64, 128
    q, k, v = torch.randn(B, Hq, D).to(dtype), torch.randn(B, Hkv, D).to(dtype), torch.randn(B, Hkv, D).to(dtype)
    cos, sin = (torch.randn(B, D).to(dtype), torch.randn(B, D).to(dtype)) if rope else (None, None)
    window_decode(q, k, v, torch.randn(B, Hq, D), torch.randn(B, Hkv, W, D).to(dtype),
                  torch.randn(B, Hkv, W, D).to(dtype), torch.ones(B, W, dtype=torch.bool), 0.088, 0.5, 0.5, cos, sin)


CASES: list[tuple[str, Any, tuple]] = [
    ("gla bf16 G4 K=V=128", _gla_case, (torch.bfloat16, 8, 2, 128, 128, False, False)),
    ("gla bf16 G4 K=V=128 varlen", _gla_case, (torch.bfloat16, 4, 1, 128, 128, False, True)),
    ("gla fp32 G1 K=V=64", _gla_case, (torch.float32, 2, 2, 64, 64, False, False)),
    ("gla+gv bf16 G4 K=128 V=64 (GSA pass 1)", _gla_case, (torch.bfloat16, 8, 2, 128, 64, True, False)),
    ("gla+gv fp32 G1 K=V=64 varlen", _gla_case, (torch.float32, 2, 2, 64, 64, True, True)),
    ("gla+gv bf16 G8 K=V=128", _gla_case, (torch.bfloat16, 8, 1, 128, 128, True, False)),
    ("swa bf16 G4 D=128 + residual", _swa_case, (torch.bfloat16, 32, 8, 128, None, True)),
    ("swa bf16 G4 D=128 softcap", _swa_case, (torch.bfloat16, 32, 8, 128, 30.0, False)),
    ("swa fp32 G1 D=64", _swa_case, (torch.float32, 4, 4, 64, None, True)),
    ("fused recurrent bf16", _recurrent_case, (torch.bfloat16,)),
    ("liger decode step bf16 G4 D=128 + rope", _decode_case, (torch.bfloat16, True)),
    ("liger decode step fp32 G4 D=128", _decode_case, (torch.float32, False)),
]


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    failed = 0
    for name, fn, args in CASES:
        t0 = time.perf_counter()
        try:
            fn(*args)
            print(f"ok    {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - report every case, then fail
            failed += 1
            msg = str(e).strip().splitlines()
            print(f"FAIL  {name}: {type(e).__name__}: {' / '.join(msg[-6:])[:1500]}", flush=True)
    print(f"{len(CASES) - failed}/{len(CASES)} cases compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
