#!/usr/bin/env bash
# Issue 25 on a GPU machine: the GPU tests it touched, the whole GPU suite, and its benchmark rows. Each mode fits
# one 10-minute device command; results go under $OUT (default gpu_out/).
#   scripts/gpu_issue25.sh tests    # the captured memory decode, MoM, recompute: the tests issue 25 changed
#   scripts/gpu_issue25.sh suite    # pytest -m gpu, everything (the count for the closing note)
#   scripts/gpu_issue25.sh train    # train_step: base, liger_attention, the memory recipe at 4K and 8K
#   scripts/gpu_issue25.sh decode   # generate: gla, liger_attention, the memory recipe, batch 8, 2K and 32K, graph
#   scripts/gpu_issue25.sh mom      # benchmarks/mom.py --gpu: fwd+bwd and decode times and peaks, MoM vs GLA
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-tests}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card_$what.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/card_$what.txt"
case $what in
  tests)
    timeout 580 python3 -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider \
      tests/test_generate.py tests/test_recompute.py tests/test_mom.py tests/test_static_cache.py \
      2>&1 | tee "$OUT/gpu_tests_issue25.log" ;;
  suite)
    timeout 580 python3 -m pytest -m gpu -q -rf --tb=short -p no:cacheprovider --durations=15 \
      2>&1 | tee "$OUT/gpu_suite.log" ;;
  train)
    timeout 580 python3 benchmarks/train_step.py --lengths 4096 8192 --steps 3 \
      --mixers liger_attention memory=examples/demo.yaml --out "$OUT/train_step_issue25.json" \
      2>&1 | tee "$OUT/train_step_issue25.log" ;;
  decode)
    timeout 580 python3 benchmarks/generate.py --mixers gla liger_attention memory=examples/demo.yaml \
      --batch 8 --context 2048 32768 --modes graph --base-modes compile --out "$OUT/generate_issue25.jsonl" \
      2>&1 | tee "$OUT/generate_issue25.log" ;;
  mom)
    timeout 580 python3 benchmarks/mom.py --gpu --tokens 32768 --contexts 1024,32768 --batch 1,16 \
      --out "$OUT/mom" 2>&1 | tee "$OUT/mom_issue25.log" ;;
  *)
    echo "usage: $0 tests|suite|train|decode|mom" >&2; exit 2 ;;
esac
