#!/usr/bin/env bash
# The one Python virtual environment of the scripts, benches and tests,
# ${DEPTHC_CACHE:-.cache}/venv, and the one way to add to it:
#
#   scripts/venv.sh [PACKAGE ...]      # prints the environment's python
#
# Makes the environment when it is missing, with what the tests use (numpy,
# onnx, onnxruntime, onnxruntime-genai, jsonschema, gguf), then installs each
# PACKAGE it lacks (a PyPI name without a version: optimum-onnx, torch, ...).
# A package pinned in scripts/versions.env is installed at that version, and
# every install is constrained by that file, so adding a package never moves
# a pinned one. Idempotent and quiet when everything is there; pip's output
# goes to stderr, the python's path alone to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS="$PWD/scripts/versions.env"
mkdir -p "${DEPTHC_CACHE:-.cache}"
CACHE="$(cd "${DEPTHC_CACHE:-.cache}" && pwd)"
VENV="$CACHE/venv"
PY="$VENV/bin/python"
BASE=(numpy onnx onnxruntime onnxruntime-genai jsonschema gguf)

# PACKAGE, or PACKAGE==VERSION when versions.env pins it.
spec() {
  local name version
  name="$(echo "$1" | tr 'a-z.-' 'A-Z__')"
  version="$(sed -n "s/^$name=//p" "$VERSIONS")"
  if [ -n "$version" ]; then echo "$1==$version"; else echo "$1"; fi
}

# One install at a time (two scripts may add to the environment at once).
if command -v flock >/dev/null; then
  exec 9>"$CACHE/venv.lock"
  flock 9
fi

if [ ! -x "$PY" ] || ! "$PY" -c "" 2>/dev/null; then
  rm -rf "$VENV" "$VENV.part"
  python3 -m venv "$VENV.part"
  mv "$VENV.part" "$VENV"
fi

specs=()
for p in "${BASE[@]}" "$@"; do
  specs+=("$(spec "$p")")
done
# The specs the environment does not satisfy: absent, or at another version.
mapfile -t missing < <("$PY" - "${specs[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have is None or (want and have != want):
        print(spec)
PY
)
if [ ${#missing[@]} -gt 0 ]; then
  constraints="$(mktemp)"
  trap 'rm -f "$constraints"' EXIT
  # NAME=value -> name==value (the data packages in the file constrain nothing here).
  awk -F= '/^[A-Z0-9_]+=/ { n = tolower($1); gsub("_", "-", n); print n "==" $2 }' \
    "$VERSIONS" > "$constraints"
  echo "venv: installing ${missing[*]} into $VENV" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check -c "$constraints" "${missing[@]}" >&2
fi
echo "$PY"
