#!/usr/bin/env python3
"""Scale check: depthc on a checkpoint with Llama-2-7B's layer shapes.

What it checks
--------------
The test suite runs on tiny models; this script checks that depthc handles
real-sized tensors and an ONNX weight file past the 2 GiB protobuf limit.
It writes a synthetic Hugging Face Llama checkpoint with Llama-2-7B's shapes
(hidden 4096, 32 heads, 32 KV heads, intermediate 11008, vocab 32000, untied
lm_head) but only ``--layers`` decoder layers (default 2), in bf16 safetensors
written by hand with seeded normal(0, 0.02) weights (norm weights are ones;
scripts/random_checkpoint.py writes it).
Then it runs, each as its own child process whose peak RSS (``os.wait4``
ru_maxrss) and wall time are measured:

  1. ``depthc inspect MODEL``
  2. ``depthc emit MODEL -o OUT/baseline``                (f32, unmodified)
  3. ``depthc validate --model MODEL OUT/baseline``       (ONNX Runtime vs. reference)
  4. ``depthc emit MODEL --plan 0-1 -o OUT/compiled``     (layers 0 and 1 as a
     parallel pair, fused form)
  5. ``depthc validate --model MODEL OUT/compiled``

and prints a table of exit code, wall seconds, peak RSS and the ratio of
peak RSS to the bf16 checkpoint bytes and to the f32 weight bytes, plus the
sizes of each emitted model.onnx / model.onnx_data. It fails (exit 1) when
any step exits non-zero (printing that step's stderr), when a
model.onnx_data is not over 2 GiB (2**31 bytes), or when validate did not
exit 0 (i.e. ONNX Runtime did not load the model or it did not match the
reference forward within validate's default tolerance).

The model has no real tokenizer. validate tokenizes text, so the script
writes a minimal WordLevel ``tokenizer.json`` whose token ``t<i>`` is id i,
and a prompt file of seeded random ``t<i>`` words: the prompt is thus a
seeded random sequence of token ids.

How to run
----------
From the repository root, after ``cargo build --release`` and
``scripts/setup.sh`` (which puts ONNX Runtime in .cache/onnxruntime/)::

    python3 scripts/scale_check.py [--depthc target/release/depthc]
        [--layers 2] [--workdir DIR] [--keep] [--steps 4]
        [--prompt-tokens 32] [--seed 0] [--ort-lib LIB]

Children run with the repository root as working directory, so depthc finds
.cache/onnxruntime/ by itself; ``--ort-lib`` overrides that.

What it needs
-------------
Python 3 with numpy. Disk: about 1.4 GB for the bf16 checkpoint (2 layers)
and about 2.7 GB per emitted f32 model (two are written), about 7 GB in all
in the work directory (a fresh directory under /tmp unless --workdir; it is
removed at the end unless --keep). Memory: the script itself stays small
(tensors are generated and written in chunks); depthc's validate holds the
ONNX Runtime session's f32 weights and, for the reference forward, the bf16
checkpoint mapped plus up to --weight-cache MiB widened (the table reports
it). Time: several minutes on 2 cores.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

import random_checkpoint
from measure import REPO, read, run_step


HIDDEN = 4096
HEADS = 32
KV_HEADS = 32
INTERMEDIATE = 11008
VOCAB = 32000
STD = 0.02


def llama_config(layers):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": INTERMEDIATE,
        "vocab_size": VOCAB,
        "num_hidden_layers": layers,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def make_checkpoint(model_dir, layers, seed):
    """The checkpoint (scripts/random_checkpoint.py): bf16, a normal draw per weight."""
    tensors = random_checkpoint.decoder_tensors(layers, HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, VOCAB,
                                                tied=False, embed_std=STD, std=STD)
    return random_checkpoint.write_checkpoint(model_dir, llama_config(layers), tensors, indent=2,
                                              dtype="BF16", fill="draws", seed=seed,
                                              metadata={"format": "pt"}, compact=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depthc", default="target/release/depthc", help="depthc binary (default: %(default)s)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    ap.add_argument("--workdir", help="work directory (default: a fresh one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--steps", type=int, default=4, help="validate decode steps (default: %(default)s)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="validate prefill tokens (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights and prompt (default: %(default)s)")
    ap.add_argument("--ort-lib", help="ONNX Runtime library passed to validate")
    args = ap.parse_args()
    if args.layers < 2:
        ap.error("--layers must be at least 2 (the plan pairs layers 0-1)")

    depthc = os.path.abspath(os.path.join(REPO, args.depthc)) if not os.path.isabs(args.depthc) else args.depthc
    if not os.access(depthc, os.X_OK):
        sys.exit(f"depthc binary not found or not executable: {depthc} (build it, or pass --depthc)")

    t_start = time.monotonic()
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        work = os.path.abspath(args.workdir)
    else:
        work = tempfile.mkdtemp(prefix="depthc-scale-", dir="/tmp")
    model = os.path.join(work, "model")
    out = os.path.join(work, "out")
    logs = os.path.join(work, "logs")
    for d in (model, out):
        if os.path.exists(d):
            sys.exit(f"{d} already exists; pass an empty --workdir")
    os.makedirs(out)
    os.makedirs(logs, exist_ok=True)
    print(f"work directory: {work}")

    try:
        t0 = time.monotonic()
        ckpt_bytes, params = make_checkpoint(model, args.layers, args.seed)
        f32_bytes = params * 4
        print(f"checkpoint: {args.layers} layers, {params:,} parameters, "
              f"bf16 file {ckpt_bytes:,} bytes ({ckpt_bytes / 2**30:.2f} GiB), "
              f"f32 weights {f32_bytes:,} bytes ({f32_bytes / 2**30:.2f} GiB), "
              f"written in {time.monotonic() - t0:.1f} s", flush=True)

        rng = np.random.default_rng(args.seed + 1)
        ids = rng.integers(0, VOCAB, size=args.prompt_tokens)
        prompt = os.path.join(work, "prompt.txt")
        with open(prompt, "w") as f:
            f.write(" ".join(f"t{i}" for i in ids) + "\n")
        print(f"prompt: {args.prompt_tokens} seeded random token ids, first {ids[:8].tolist()}")

        ort = ["--ort-lib", args.ort_lib] if args.ort_lib else []
        val = ["--steps", str(args.steps), "--text", prompt, "--prompt-tokens", str(args.prompt_tokens)] + ort
        steps = [
            ("inspect", [depthc, "inspect", model], None),
            ("emit baseline", [depthc, "emit", model, "-o", os.path.join(out, "baseline")], None),
            ("validate baseline", [depthc, "validate", "--model", model, os.path.join(out, "baseline")] + val,
             "emit baseline"),
            ("emit compiled", [depthc, "emit", model, "--plan", "0-1", "--form", "fused",
                               "-o", os.path.join(out, "compiled")], None),
            ("validate compiled", [depthc, "validate", "--model", model, os.path.join(out, "compiled")] + val,
             "emit compiled"),
        ]
        results = {}
        for name, argv, needs in steps:
            if needs and results[needs]["rc"] != 0:
                print(f"{name}: skipped ({needs} failed)")
                results[name] = {"step": name, "rc": None}
                continue
            results[name] = run_step(name.replace(" ", "_"), argv, logs)
            results[name]["step"] = name

        print()
        for name in ("inspect", "validate baseline", "validate compiled"):
            r = results[name]
            if r.get("stdout"):
                print(f"--- {name} stdout ---")
                print(read(r["stdout"]).rstrip())
        print()

        hdr = f"{'step':<18} {'exit':>4} {'wall s':>8} {'peak RSS GiB':>13} {'RSS/bf16 ckpt':>14} {'RSS/f32 weights':>16}"
        print(hdr)
        print("-" * len(hdr))
        for name, _, _ in steps:
            r = results[name]
            if r["rc"] is None:
                print(f"{name:<18} {'skip':>4}")
                continue
            print(f"{name:<18} {r['rc']:>4} {r['wall']:>8.1f} {r['rss'] / 2**30:>13.2f} "
                  f"{r['rss'] / ckpt_bytes:>14.2f} {r['rss'] / f32_bytes:>16.2f}")
        print(f"(bf16 checkpoint {ckpt_bytes / 2**30:.2f} GiB, f32 weights {f32_bytes / 2**30:.2f} GiB)")
        print()

        failures = []
        print(f"{'emitted model':<14} {'model.onnx bytes':>17} {'model.onnx_data bytes':>22} {'data GiB':>9}")
        for form in ("baseline", "compiled"):
            d = os.path.join(out, form)
            onnx_p, data_p = os.path.join(d, "model.onnx"), os.path.join(d, "model.onnx_data")
            if not os.path.isfile(onnx_p) or not os.path.isfile(data_p):
                print(f"{form:<14} {'missing':>17}")
                failures.append(f"{form}: model.onnx or model.onnx_data missing")
                continue
            so, sd = os.path.getsize(onnx_p), os.path.getsize(data_p)
            print(f"{form:<14} {so:>17,} {sd:>22,} {sd / 2**30:>9.2f}")
            if sd <= 2**31:
                failures.append(f"{form}: model.onnx_data is {sd:,} bytes, not over 2**31")
        print()

        for name, _, _ in steps:
            r = results[name]
            if r["rc"] is None:
                failures.append(f"{name}: skipped")
            elif r["rc"] != 0:
                failures.append(f"{name}: exit code {r['rc']}")
                print(f"--- {name} stderr ---")
                print(read(r["stderr"]).rstrip())
                print(f"--- {name} stdout ---")
                print(read(r["stdout"]).rstrip())
        print(f"total time {time.monotonic() - t_start:.1f} s")
        if failures:
            print("FAILED:")
            for f in failures:
                print(f"  {f}")
            return 1
        print("OK: both models emitted with model.onnx_data over 2 GiB, and both validated in ONNX Runtime")
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
