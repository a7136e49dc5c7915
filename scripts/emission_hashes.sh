#!/usr/bin/env bash
# Emits SmolLM2-135M with no plan and with a 6-pair plan, in both forms, both
# op modes, float32 and float16 (16 models), then the Qwen2, Qwen3 and Mistral
# fixtures and Gemma 3 270M with plans in the same 8 ways, and prints the
# sha256 of each model's model.onnx, model.onnx_data and genai_config.json,
# one line a file.
# A refactor of the graph code must leave these unchanged: run it with the
# binary before and after and compare the outputs (`diff`).
#
#   scripts/emission_hashes.sh [DEPTHC_BINARY] > hashes.txt
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/release/depthc}"
CACHE="${DEPTHC_CACHE:-$PWD/.cache}"
MODEL="$CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -s "$MODEL" ] || { echo "emission_hashes: $MODEL missing (run scripts/setup.sh)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
emit_all() { # NAME MODEL PLAN
  for form in fused branches; do
    for ops in portable ort; do
      for dtype in f32 f16; do
        tag="$1 plan=${3:-none} form=$form ops=$ops dtype=$dtype"
        out="$work/m"
        "$BIN" emit "$2" --plan "$3" -o "$out" --form "$form" --ops "$ops" --dtype "$dtype" >/dev/null
        for f in model.onnx model.onnx_data genai_config.json; do
          echo "$tag $f $(sha256sum "$out/$f" | cut -d' ' -f1)"
        done
        rm -rf "$out"
      done
    done
  done
}
emit_all smollm2 "$MODEL" ""
emit_all smollm2 "$MODEL" "12-13,14-15,17-18,21-22,24-25,26-27"
for family in qwen2 qwen3 mistral; do
  emit_all "$family" fixtures/families/$family "1-2"
done
emit_all llama3 fixtures/tiny_llama/hf_llama3 "0-1,2-3"
GEMMA="$CACHE/gemma3/gemma-3-270m-q4_k_m.gguf"
[ -s "$GEMMA" ] && emit_all gemma3 "$GEMMA" "4-5,8-9"
