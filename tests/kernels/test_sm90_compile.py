"""Every Triton kernel compiles for sm_90 (H100/H200) without a GPU: ``tests/kernels/sm90_compile.py``.

The interpreter tests check what the kernels compute; this checks that the compiler accepts them and that they fit
an H200's shared memory. It takes a few minutes on two cores, so it runs only with ``SURGERY_SM90_COMPILE=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SURGERY_SM90_COMPILE") != "1", reason="set SURGERY_SM90_COMPILE=1 (minutes)")
def test_every_kernel_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "cases compiled for sm_90" in run.stdout
