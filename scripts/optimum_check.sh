#!/usr/bin/env bash
# Optimum's ORTModelForCausalLM on depthc's output, off CI's path (Optimum
# pulls torch: it adds ~6 GB to the virtual environment). Adds optimum-onnx
# (at the version scripts/versions.env pins) to the shared environment
# .cache/venv once (scripts/venv.sh), then runs scripts/optimum_check.py:
# folders from `depthc compile` (tiny fixture) and `depthc emit` (SmolLM2: no
# plan, a plan, the plan in float16) loaded with no option, 16 greedy tokens
# each compared with the reference forward's (`depthc validate`).
#
#   scripts/optimum_check.sh            # after scripts/setup.sh and cargo build --release
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(scripts/venv.sh optimum-onnx)"
exec "$PY" scripts/optimum_check.py "$@"
