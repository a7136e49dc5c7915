"""Per-op profile of decoder models in ONNX Runtime (CPU), to see what limits a speed-up.

For each directory: a prefill of N tokens and D greedy-free decode steps (fixed ids) with
the KV cache, ONNX Runtime's profiler on; prints the total time per op type (ms, share),
for prefill and decode separately, side by side for all directories.

  .cache/venv/bin/python benches/profile_ops.py DIR [DIR ...] [--prefill 128] [--decode 32] [--batch 1]
"""
import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("dirs", nargs="+")
ap.add_argument("--prefill", type=int, default=128)
ap.add_argument("--decode", type=int, default=32)
ap.add_argument("--batch", type=int, default=1)
args = ap.parse_args()


def run(d):
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "p")
    s = ort.InferenceSession(os.path.join(d, "model.onnx"), so, providers=["CPUExecutionProvider"])
    # Shapes from the graph itself, so that any decoder with this I/O loads (the
    # onnxruntime-genai builder's export has no config.json and no position_ids).
    inputs = {i.name: i for i in s.get_inputs()}
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    kv, hd = inputs["past_key_values.0.key"].shape[1], inputs["past_key_values.0.key"].shape[3]
    if not isinstance(hd, int):  # a named dimension: the genai config says
        hd = json.load(open(os.path.join(d, "genai_config.json")))["model"]["decoder"]["head_size"]
    vocab = next(o for o in s.get_outputs() if o.name == "logits").shape[-1]
    b = args.batch

    def feed(ids, past, past_len):
        n = ids.shape[1]
        f = {"input_ids": ids, "attention_mask": np.ones((b, past_len + n), np.int64)}
        if "position_ids" in inputs:
            f["position_ids"] = np.tile(np.arange(past_len, past_len + n, dtype=np.int64), (b, 1))
        for i in range(layers):
            for k in ("key", "value"):
                f[f"past_key_values.{i}.{k}"] = past[f"{i}.{k}"]
        return f

    empty = {f"{i}.{k}": np.zeros((b, kv, 0, hd), np.float32) for i in range(layers) for k in ("key", "value")}
    ids = (np.arange(args.prefill, dtype=np.int64) * 7919 + 13) % vocab
    ids = np.tile(ids, (b, 1))
    names = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    s.run(names, feed(ids, empty, 0))  # warm-up: its events are dropped below
    marks = []
    out = s.run(names, feed(ids, empty, 0))
    marks.append("prefill")
    past = {n[len("present."):]: o for n, o in zip(names[1:], out[1:])}
    plen = args.prefill
    for t in range(args.decode):
        step = np.full((b, 1), (t * 31 + 7) % vocab, np.int64)
        out = s.run(names, feed(step, past, plen))
        past = {n[len("present."):]: o for n, o in zip(names[1:], out[1:])}
        plen += 1
    trace = json.load(open(s.end_profiling()))
    runs = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"]
    nodes = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    # model_run events in order: warm-up, prefill, decode steps.
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    phase = {"prefill": collections.Counter(), "decode": collections.Counter()}
    wall = {"prefill": spans[1][1] - spans[1][0], "decode": sum(e - s for s, e in spans[2:])}
    for e in nodes:
        for k, (s0, s1) in enumerate(spans):
            if s0 <= e["ts"] <= s1 and k >= 1:
                phase["prefill" if k == 1 else "decode"][e["args"]["op_name"]] += e["dur"]
    return phase, wall, sum(1 for e in nodes if spans[1][0] <= e["ts"] <= spans[1][1])


results = {d: run(d) for d in args.dirs}
for ph in ("prefill", "decode"):
    print(f"== {ph} ({args.prefill if ph == 'prefill' else args.decode} "
          f"{'tokens' if ph == 'prefill' else 'steps'}, batch {args.batch}); ms per op type")
    ops = collections.Counter()
    for phase, _, _ in results.values():
        ops.update(phase[ph])
    header = "".join(f"{os.path.basename(os.path.normpath(d)):>14}" for d in args.dirs)
    print(f"{'op':<22}{header}")
    for op, _ in ops.most_common(14):
        print(f"{op:<22}" + "".join(f"{results[d][0][ph][op] / 1e3:>14.2f}" for d in args.dirs))
    print(f"{'(sum of kernels)':<22}" + "".join(f"{sum(results[d][0][ph].values()) / 1e3:>14.2f}" for d in args.dirs))
    print(f"{'(wall, model_run)':<22}" + "".join(f"{results[d][1][ph] / 1e3:>14.2f}" for d in args.dirs))
print("kernels per prefill run: " + ", ".join(f"{os.path.basename(os.path.normpath(d))} {results[d][2]}" for d in args.dirs))
