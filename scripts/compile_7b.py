#!/usr/bin/env python3
"""7B class on this machine: `depthc compile` on a full-depth checkpoint with
Llama-2-7B's shapes, end to end, with each stage's wall time and peak RSS.

What it does
------------
1. Writes a Hugging Face Llama checkpoint with Llama-2-7B's shapes at full
   depth (32 layers, hidden 4096, 32 heads, intermediate 11008, vocabulary
   32000, untied LM head: 6.74 B parameters), bf16 safetensors of seeded
   normal(0, 0.02) weights, 13.5 GB, and a WordLevel tokenizer whose token
   `t<i>` is id i (``scripts/scale_check.py`` writes both; this script
   reuses it with ``--layers 32``). A calibration text of seeded random
   tokens goes beside it.
2. Runs, as one child process whose peak RSS (``os.wait4``) and wall time are
   measured::

       depthc compile MODEL -o OUT --dtype int4 --form fused --ops portable \\
           --calib CALIB --seq-len 128 --max-tokens 128 --pairs 1 \\
           --protect-first 14 --protect-last 14 --steps 2 --runs 1

   i.e. a short calibration (one window of 128 tokens) and a narrow search
   (pairs among the middle layers), then 4-bit emission of the baseline and
   the compiled model, validation of both in ONNX Runtime (as written, and
   at accuracy level 0) and the benchmark.
3. Prints compile's own stage table (``stages`` of the report: wall time and
   peak RSS of each stage) and the whole run's peak RSS against the machine's
   memory, and fails (exit 1) when compile fails or its peak passes
   ``--limit-gib`` (default 24).

How to run
----------
From the repository root, after ``cargo build --release`` and
``scripts/setup.sh``::

    python3 scripts/compile_7b.py [--depthc target/release/depthc]
        [--workdir DIR] [--keep] [--limit-gib 24] [--layers 32]

What it needs
-------------
Python 3 with numpy. Disk: 13.5 GB for the checkpoint and about 4 GB per
emitted int4 model (two kept), about 22 GB in the work directory (a fresh
one under /tmp unless --workdir; removed at the end unless --keep). Time on
2 cores: about half an hour. Off CI, like ``scripts/scale_check.py``.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_check  # noqa: E402  (the checkpoint writer)
from measure import REPO, read, run_step  # noqa: E402
GIB = 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depthc", default="target/release/depthc", help="depthc binary (default: %(default)s)")
    ap.add_argument("--workdir", help="work directory (default: a fresh one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (default: %(default)s, Llama-2-7B's)")
    ap.add_argument("--limit-gib", type=float, default=24.0, help="peak RSS allowed (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights and text (default: %(default)s)")
    args = ap.parse_args()
    protect = max(0, args.layers // 2 - 2)

    depthc = args.depthc if os.path.isabs(args.depthc) else os.path.join(REPO, args.depthc)
    if not os.access(depthc, os.X_OK):
        sys.exit(f"depthc binary not found or not executable: {depthc} (build it, or pass --depthc)")
    work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="depthc-7b-", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    model, out = os.path.join(work, "model"), os.path.join(work, "out")
    if os.path.exists(model) or os.path.exists(out):
        sys.exit(f"{work} is not empty; pass an empty --workdir")
    print(f"work directory: {work}", flush=True)
    try:
        t0 = time.monotonic()
        ckpt_bytes, params = scale_check.make_checkpoint(model, args.layers, args.seed)
        print(f"checkpoint: {args.layers} layers, {params:,} parameters, bf16 {ckpt_bytes / GIB:.2f} GiB "
              f"(f32 would be {params * 4 / GIB:.2f} GiB), written in {time.monotonic() - t0:.0f} s", flush=True)
        rng = np.random.default_rng(args.seed + 1)
        calib = os.path.join(work, "calib.txt")
        with open(calib, "w") as f:
            f.write(" ".join(f"t{i}" for i in rng.integers(3, scale_check.VOCAB, size=512)) + "\n")

        argv = [depthc, "compile", model, "-o", out, "--dtype", "int4", "--form", "fused",
                "--ops", "portable", "--calib", calib, "--seq-len", "128", "--max-tokens", "128",
                "--pairs", "1", "--protect-first", str(protect), "--protect-last", str(protect),
                "--steps", "2", "--runs", "1"]
        logs = os.path.join(work, "logs")
        os.makedirs(logs, exist_ok=True)
        r = run_step("compile", argv, logs)
        wall, peak = r["wall"], r["rss"]
        print(read(r["stdout"]).rstrip())
        if r["rc"] != 0:
            print(read(r["stderr"]).rstrip())
            return 1
        with open(os.path.join(out, "report", "search-report.json")) as f:
            report = json.load(f)
        print(f"\nchosen plan {report['chosen_plan']}, depth {report['depth_before']} -> {report['depth_after']}")
        print("\n| stage | wall s | peak RSS GiB |\n|---|---|---|")
        for st in report["stages"]:
            rss = st["peak_rss_bytes"]
            print(f"| {st['stage']} | {st['seconds']:.0f} | {'-' if rss is None else f'{rss / GIB:.2f}'} |")
        print(f"| compile (whole process) | {wall:.0f} | {peak / GIB:.2f} |")
        for name in ("baseline", "compiled"):
            data = os.path.join(out, name, "model.onnx_data")
            print(f"{name}: model.onnx_data {os.path.getsize(data) / GIB:.2f} GiB")
        b = report["benchmark"]
        print(f"benchmark (1 round): prefill x{b['prefill_speedup']:.3f}, decode x{b['decode_speedup']:.3f}")
        if peak > args.limit_gib * GIB:
            print(f"FAILED: peak RSS {peak / GIB:.2f} GiB is over {args.limit_gib} GiB")
            return 1
        print(f"OK: compiled end to end within {args.limit_gib} GiB")
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
