#!/usr/bin/env bash
# Fuzz every target in fuzz/ for a bounded time each (default 120 s), starting
# from the seeds (fuzz/seeds/TARGET, made by fuzz/make_seeds.py) and the kept
# corpus, then merge what adds coverage into the corpus (fuzz/corpus/TARGET).
# Needs the nightly toolchain and cargo-fuzz:
#   rustup toolchain install nightly && cargo install cargo-fuzz --locked
# Usage: scripts/fuzz.sh [SECONDS] [TARGET ...]
# A crash stops the script with libFuzzer's report; the input is kept in
# fuzz/artifacts/TARGET/ (add it to the corpus once fixed).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-120}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors_header gguf config_json plan)
# Address sanitizer, debug assertions (integer overflow) on, optimised.
cargo +nightly fuzz build -O
bin="target/$(rustc -vV | sed -n 's/^host: //p')/release"
for t in "${targets[@]}"; do
    case "$t" in
        gguf) max_len=32768 ;;
        safetensors_header) max_len=4096 ;;
        config_json) max_len=2048 ;;
        *) max_len=256 ;;
    esac
    echo "== $t: ${secs} s, inputs up to $max_len bytes"
    mkdir -p "artifacts/$t" "corpus/$t"
    log="$(mktemp)"
    found="$(mktemp -d)"
    # -rss_limit_mb: a reader that allocates what a file claims rather than
    # what it holds is a bug; -timeout: so is one that hangs on an input.
    if ! "$bin/$t" "$found" "corpus/$t" "seeds/$t" -max_len="$max_len" \
        -max_total_time="$secs" -rss_limit_mb=2048 \
        -timeout=20 -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "== $t: FAILED (input kept in fuzz/artifacts/$t/)"
        exit 1
    fi
    grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|Done)" "$log" || true
    # Keep only the inputs that add coverage.
    "$bin/$t" -merge=1 "corpus/$t" "seeds/$t" "$found" >/dev/null 2>&1
    rm -rf "$log" "$found"
    echo "corpus: $(ls "corpus/$t" | wc -l) inputs, $(du -sh "corpus/$t" | cut -f1)"
done
