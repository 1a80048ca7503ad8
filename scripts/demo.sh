#!/usr/bin/env bash
# The main job on the embedded default: install, build the offline demo (SmolLM2-135M + Wikipedia excerpt),
# then convert -> recover -> evaluate -> save as examples/demo.yaml says. Extra arguments go to `surgery run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/surgery fetch-demo
exec .venv/bin/surgery run examples/demo.yaml "$@"
