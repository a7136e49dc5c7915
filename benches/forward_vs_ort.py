#!/usr/bin/env python3
"""The reference forward against ONNX Runtime, and weights kept against
weights read from their stored blocks, on SmolLM2-135M and Qwen2.5-Coder-1.5B.

For each model, in one run:

  1. ``depthc bench-forward MODEL --against-ort``: the full-sequence forward at
     1x256 against ONNX Runtime's CPU prefill of the same ids on depthc's own
     unmodified f32 emission, rounds alternating inside the command, with the
     default ``--weight-cache`` (half of the memory available);
  2. ``depthc bench-forward MODEL`` with the default cache and with
     ``--weight-cache 0`` (nothing kept: every product widens its weight's
     stored blocks a panel at a time), as separate processes, alternating.

Prints a markdown table: depthc / ONNX Runtime (median of the per-round ratios
and their range: > 1 when depthc is faster), and nothing kept / all kept
(ratio of medians over the alternating processes, and the peak RSS of each).

How to run, from the repository root after ``scripts/setup.sh`` and
``cargo build --release``::

    python3 benches/forward_vs_ort.py [--repeats 7] [--pairs 3] [--threads 2]
        [--only smollm2|qwen]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("DEPTHC_CACHE", os.path.join(REPO, ".cache"))
MODELS = {
    "smollm2": ("SmolLM2-135M", "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "qwen": ("Qwen2.5-Coder-1.5B", "qwen2.5/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
}


def bench(depthc, model, repeats, threads, extra):
    cmd = [depthc, "bench-forward", model, "--repeats", str(repeats), "--json", *extra]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depthc", default=os.path.join(REPO, "target/release/depthc"))
    ap.add_argument("--repeats", type=int, default=7, help="timed forwards per process")
    ap.add_argument("--pairs", type=int, default=3, help="alternating pairs of processes, kept against nothing kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=sorted(MODELS))
    a = ap.parse_args()
    rows = []
    for key, (name, rel) in MODELS.items():
        if a.only and key != a.only:
            continue
        path = os.path.join(CACHE, rel)
        if not os.path.exists(path):
            sys.exit(f"{path} missing: run scripts/setup.sh")
        print(f"{name}: against ONNX Runtime", file=sys.stderr)
        vs = bench(a.depthc, path, a.repeats, a.threads, ["--against-ort"])
        kept, streamed = [], []
        for i in range(a.pairs):
            print(f"{name}: kept / nothing kept, pair {i + 1} of {a.pairs}", file=sys.stderr)
            order = [("kept", []), ("none", ["--weight-cache", "0"])]
            if i % 2:
                order.reverse()
            for which, extra in order:
                r = bench(a.depthc, path, a.repeats, a.threads, extra)
                (kept if which == "kept" else streamed).append(r)
        med = lambda rs: statistics.median(r["median_s"] for r in rs)  # noqa: E731
        peak = lambda rs: max(r["peak_rss_bytes"] or 0 for r in rs) / 2**30  # noqa: E731
        o = vs["ort"]
        rows.append(
            f"| {name} | {vs['median_s'] * 1e3:.1f} | {o['median_s'] * 1e3:.1f} "
            f"| x{o['ratio']:.3f} ({o['ratio_min']:.3f}..{o['ratio_max']:.3f}) "
            f"| {med(kept) * 1e3:.1f} ({peak(kept):.2f} GiB) | {med(streamed) * 1e3:.1f} ({peak(streamed):.2f} GiB) "
            f"| x{med(streamed) / med(kept):.3f} |"
        )
    print(f"forward 1x256, {a.threads} threads, {a.repeats} timed forwards a process")
    print()
    print("| model | depthc ms | ONNX Runtime ms | depthc / ONNX Runtime (rounds) "
          "| all kept ms (peak RSS) | nothing kept ms (peak RSS) | nothing kept / all kept time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
