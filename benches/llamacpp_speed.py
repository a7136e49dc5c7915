#!/usr/bin/env python3
"""A Layer-Parallel GGUF against the original GGUF in llama.cpp.

Writes the plan with `depthc emit --format gguf`, then measures, in one run on
the same threads: both files' sizes; the plan's KL from the original on a text
(`depthc eval --format gguf`: the weights the GGUF holds, depthc's reference
forward); and prefill and decode tokens/s of both in llama.cpp
(node-llama-cpp's prebuilt CPU binary, tests/llama/bench.mjs), in alternating
rounds. Per measure: the ratio of each round, their median and range, and the
verdict of `depthc bench` (faster or slower only when every round agrees).

    python3 benches/llamacpp_speed.py MODEL.gguf --plan P [--rounds 7]
        [--prompt-tokens 256] [--decode-tokens 64] [--threads 2] [--text FILE]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("DEPTHC_CACHE", os.path.join(ROOT, ".cache"))


def verdict(ratios):
    if all(r > 1 for r in ratios):
        return "faster"
    if all(r < 1 for r in ratios):
        return "slower"
    return "no measurable difference"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--encoding", default="q8_0")
    ap.add_argument("--text", default=os.path.join(
        CACHE, "texts/miltondata/texts/paradise_lost_(no_introduction)_gut.txt"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/depthc"))
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="depthc-llamacpp-")
    out = os.path.join(tmp, "lp")
    subprocess.run([a.binary, "emit", a.model, "-o", out, "--format", "gguf", "--plan", a.plan,
                    "--gguf-encoding", a.encoding], check=True, stdout=subprocess.DEVNULL)
    lp = os.path.join(out, "model.gguf")
    ev = json.loads(subprocess.run(
        [a.binary, "eval", a.model, "--text", a.text, "--plan", a.plan, "--max-windows",
         str(a.windows), "--prompts", "0", "--json", "--format", "gguf", "--gguf-encoding", a.encoding],
        check=True, capture_output=True, text=True).stdout)
    print(f"$ node tests/llama/bench.mjs ORIGINAL LP {a.rounds} {a.prompt_tokens} {a.decode_tokens} {a.threads}",
          file=sys.stderr, flush=True)
    r = json.loads(subprocess.run(
        ["node", "bench.mjs", os.path.abspath(a.model), lp, str(a.rounds), str(a.prompt_tokens),
         str(a.decode_tokens), str(a.threads)],
        cwd=os.path.join(ROOT, "tests/llama"), check=True, capture_output=True, text=True).stdout)
    size = lambda p: os.path.getsize(p) / 2**20
    print(f"model {a.model}\nplan  {a.plan} ({a.encoding})\n")
    print(f"| | original | Layer-Parallel |\n|---|---|---|")
    print(f"| file | {size(a.model):.1f} MiB | {size(lp):.1f} MiB |")
    print(f"| KL from the original ({a.windows} x 256 tokens of {os.path.basename(a.text)}) | 0 | {ev['kl']:.4f} |")
    for m in ("prefill", "decode"):
        ra = [y / x for x, y in zip(r["a"][m], r["b"][m])]
        med = lambda v: statistics.median(v)
        print(f"| {m} tokens/s (median of {a.rounds}) | {med(r['a'][m]):.1f} | {med(r['b'][m]):.1f} |")
        print(f"| {m} ratio per round: median, range, verdict | | x{med(ra):.3f} ({min(ra):.3f}..{max(ra):.3f}), {verdict(ra)} |")


if __name__ == "__main__":
    main()
