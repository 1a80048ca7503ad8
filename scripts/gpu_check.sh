#!/usr/bin/env bash
# GPU check of our Triton kernels (GLA with gk/gv, GSA, Liger attention): every GPU test under tests/kernels, the
# kernel benchmark, then the whole-model training-step benchmark. Results go under $OUT (default gpu_out/).
#   scripts/gpu_check.sh [tests|bench|train|all] [extra arguments for benchmarks/kernel_times.py]
# The training-step benchmark needs the full package (transformers, pydantic); it is skipped with a note if
# `import surgery` fails on this machine.
# fla (the benchmark's yardstick) is installed from .whl/ when present (see benchmarks/kernel_times.py).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
shift || true
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# The kernels need only torch and triton. A bare GPU image may miss what `import surgery` pulls in (pydantic, a
# recent transformers), so if that import fails, a pytest plugin puts a bare `surgery` package in its place.
mkdir -p /tmp/gla_stub
cat > /tmp/gla_stub/gla_stub.py <<PY
import os, sys, types
try:
    import surgery  # noqa: F401
except Exception:
    for name in [m for m in sys.modules if m == "surgery" or m.startswith("surgery.")]:
        del sys.modules[name]
    pkg = types.ModuleType("surgery")
    pkg.__path__ = [os.path.join("$PWD", "surgery")]
    sys.modules["surgery"] = pkg
PY
export PYTHONPATH=/tmp/gla_stub:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [[ $what == tests || $what == all ]]; then
  timeout 540 python3 -m pytest -p gla_stub tests/kernels -m gpu -q -rf --tb=short \
    --durations=10 2>&1 | tee "$OUT/gpu_tests.log"
fi
if [[ $what == bench || $what == all ]]; then
  python3 -c "import gla_stub, runpy, sys; sys.argv = ['kernel_times.py', '--out', '$OUT/gla_bench.json', *sys.argv[1:]]; runpy.run_path('benchmarks/kernel_times.py', run_name='__main__')" "$@" 2>&1 | tee "$OUT/bench.log"
fi
if [[ $what == train || $what == all ]]; then
  if python3 -c "import surgery; surgery.load_plan" >/dev/null 2>&1; then
    timeout 900 python3 benchmarks/train_step.py --out "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log"
  else
    echo "train_step: skipped (import surgery failed: the package's dependencies are missing here)" | tee "$OUT/train_step.log"
  fi
fi
