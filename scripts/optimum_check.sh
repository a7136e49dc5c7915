#!/usr/bin/env bash
# Optimum's ORTModelForCausalLM on depthc's output, off CI's path (Optimum
# pulls torch: a ~6 GB virtual environment). Makes .cache/optimum-venv
# (optimum-onnx 0.1.0, onnxruntime 1.31.1) once, then runs
# scripts/optimum_check.py: folders from `depthc compile` (tiny fixture) and
# `depthc emit` (SmolLM2: no plan, a plan, the plan in float16) loaded with no option, 16 greedy
# tokens each compared with the reference forward's (`depthc validate`).
#
#   scripts/optimum_check.sh            # after scripts/setup.sh and cargo build --release
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${DEPTHC_CACHE:-$PWD/.cache}"
VENV="$CACHE/optimum-venv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import optimum.onnxruntime" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV.part"
  "$VENV.part/bin/python" -m pip install --quiet --disable-pip-version-check \
    optimum-onnx==0.1.0 onnxruntime==1.31.1
  mv "$VENV.part" "$VENV"
fi
exec "$VENV/bin/python" scripts/optimum_check.py "$@"
