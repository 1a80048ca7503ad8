#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the test suite. GPU tests are skipped without CUDA; Triton kernels run in
# the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 before any kernel is imported).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The real-model tests (tests/test_smollm2.py) need the offline demo model: built once, ~30 s, cached in .cache/.
.venv/bin/surgery fetch-demo
exec .venv/bin/python -m pytest -q "$@"
