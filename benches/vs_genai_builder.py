#!/usr/bin/env python3
"""depthc's ONNX exports against the onnxruntime-genai model builder's, on SmolLM2-135M.

In one run, with alternating repetitions, ONNX Runtime (CPU, fp32, Python API, default
threads) measures for each model:
  prefill  latency of a 128-token prompt from an empty cache (the fastest of 3 calls);
  decode   tokens/s of 128 greedy steps after a 32-token prompt, each step feeding the
           previous step's present.* back as past_key_values.* (batch 1 and batch 8).
           The models decode interleaved: 8 blocks of 16 steps each, taking turns block
           by block (each block begun by the next model in turn, after a pause in which
           the last session's threads go idle), so that all meet the same moments of a
           shared machine; a model's time is the sum of its blocks.
  plain    tokens/s of the same batch-1 decode in a plain loop: each model's 128 steps
           in one go, the models one after another in the round's order (how a user's
           own script decodes; the machine's moments are not shared out).
  genai    tokens/s of the same decode through onnxruntime-genai (batch 1), as a
           serving user runs it.
Models: the builder's export of the same weights (the baseline of every ratio), depthc's
unmodified model in both operator modes (`--ops portable`, `--ops ort`), and depthc's
compiled model (6 parallel pairs, fused form) in both modes.

Ratios are taken per round (each model against the builder's run of the same round) and
summarised as median [min-max]. Batch-1 decode is weight-bandwidth bound: the script
measures how many weight bytes/s one large MatMul streams here and how many each model's
decode streams.

It also writes the portable baseline as ONNX Runtime optimises it
(SessionOptions.optimized_model_filepath) and prints which ops the optimiser made, and
(with --profile) a per-op time profile of the decode of each model.

With --precision int4 every model holds 4-bit weights: the builder's `-p int4` export
(MatMulNBits, symmetric blocks of 32, accuracy level 4: its CPU defaults) against
depthc's `--dtype int4` (the same settings, the same quantiser), and each model's size
on disk is printed.

Run from the repository root after scripts/setup.sh and `cargo build --release`:
    python3 benches/vs_genai_builder.py [--runs 7] [--precision int4]
The builder needs torch, transformers, onnx, onnx_ir and onnxruntime-genai: the script
adds the ones missing to the shared virtual environment .cache/venv (scripts/venv.sh, at
the versions scripts/versions.env pins) and runs the measurements in it.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import pins  # noqa: E402  (scripts/pins.py: the shared virtual environment)

CACHE = os.environ.get("DEPTHC_CACHE", os.path.join(ROOT, ".cache"))
GGUF = os.path.join(CACHE, "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
# The 6-pair plan the search chooses on SmolLM2 (docs/RESULTS.md, "Search").
PLAN = "12-13,14-15,17-18,21-22,24-25,26-27"
# What the builder needs beyond the environment's own numpy, onnx, onnxruntime
# and onnxruntime-genai.
PACKAGES = ["torch", "transformers", "onnx_ir"]


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def export(work, depthc, py, precision):
    hf = os.path.join(work, "hf")
    for d in os.listdir(work):  # a kept folder from an earlier run: export afresh
        shutil.rmtree(os.path.join(work, d), ignore_errors=True)
    run([depthc, "convert", GGUF, "-o", hf])
    models = {"builder": os.path.join(work, "builder")}
    # int4: the builder's CPU defaults (symmetric blocks of 32, accuracy level 4),
    # which are depthc's --dtype int4 defaults.
    run([py, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", models["builder"],
         "-p", precision, "-e", "cpu", "-c", os.path.join(work, "builder-cache")])
    dtype = {"fp32": "f32", "int4": "int4"}[precision]
    for ops in ["portable", "ort"]:
        for name, plan in [("baseline", ""), ("compiled", PLAN)]:
            out = os.path.join(work, f"{name}-{ops}")
            run([depthc, "emit", GGUF, "--plan", plan, "--ops", ops, "--form", "fused",
                 "--dtype", dtype, "-o", out])
            models[f"depthc {name} {ops}"] = out
    return models


def size_mb(folder):
    """Bytes of the model files on disk (graph and weights), in MB."""
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith((".onnx", ".onnx.data", ".onnx_data"))) / 1e6


MEASURE = r'''
import json, sys, time
import numpy as np
import onnxruntime as ort

spec = json.loads(sys.argv[1])
sessions, layouts = {}, {}

def open_session(name, profile):
    d = spec["models"][name]
    so = ort.SessionOptions()
    if name == "depthc baseline portable" and not profile:
        so.optimized_model_filepath = spec["optimized"]
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = spec["profile_dir"] + "/" + name.replace(" ", "_")
    s = ort.InferenceSession(d + "/model.onnx", so, providers=["CPUExecutionProvider"])
    with open(d + "/genai_config.json") as f:
        dec = json.load(f)["model"]["decoder"]
    names = [i.name for i in s.get_inputs()]
    past = [i.name for i in s.get_inputs() if i.name.startswith("past_key_values")]
    layouts[name] = (names, past, dec["num_key_value_heads"], dec["head_size"])
    return s

for name in spec["models"]:
    sessions[name] = open_session(name, False)

vocab = 49152
rng = np.random.default_rng(0)
prompt_ids = rng.integers(100, vocab, (1, 128))

def feed(name, ids, past, past_len):
    names, past_names, kv, hd = layouts[name]
    b, s = ids.shape
    f = {"input_ids": ids, "attention_mask": np.ones((b, past_len + s), np.int64)}
    if "position_ids" in names:
        f["position_ids"] = np.tile(np.arange(past_len, past_len + s), (b, 1))
    for i, p in enumerate(past_names):
        f[p] = np.zeros((b, kv, 0, hd), np.float32) if past is None else past[i]
    return f

def step(name, ids, past, past_len):
    s = sessions[name]
    outs = s.run(None, feed(name, ids, past, past_len))
    return outs[0], outs[1:]

def prefill(name, batch, calls=3):
    """The fastest of `calls` prefills (one alone is at the mercy of the machine)."""
    ids = np.tile(prompt_ids, (batch, 1))
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        step(name, ids, None, 0)
        best = min(best, time.perf_counter() - t)
    return best * 1000

import onnxruntime_genai as og

def decode_all(names, batch, turn, prompt=32, new=128, blocks=8):
    """Tokens/s of every model's greedy decode, interleaved block by block; `turn`
    rotates which model begins each block (one model and one block: a plain decode)."""
    ids = np.tile(prompt_ids[:, :prompt], (batch, 1))
    state, spent = {}, {n: 0.0 for n in names}
    for n in names:
        logits, past = step(n, ids, None, 0)
        state[n] = (logits, past, prompt)
    per = new // blocks
    for blk in range(blocks):
        k = (turn + blk) % len(names)
        for n in names[k:] + names[:k]:
            time.sleep(0.03)  # the last session's spinning threads go idle
            logits, past, length = state[n]
            t = time.perf_counter()
            for _ in range(per):
                nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
                logits, past = step(n, nxt, past, length)
                length += 1
            spent[n] += time.perf_counter() - t
            state[n] = (logits, past, length)
    return {n: batch * per * blocks / spent[n] for n in names}

def genai_decode(name, prompt=32, new=128):
    """Greedy decode through onnxruntime-genai (how the builder's export is served)."""
    model = og.Model(spec["models"][name])
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=prompt + new, min_length=prompt + new)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt_ids[0, :prompt].tolist())
    t = time.perf_counter()
    for _ in range(new):
        gen.generate_next_token()
    return new / (time.perf_counter() - t)

def gemv_gb_per_s(k=576, n=245760):
    """Weight bytes/s of one [1, k] x [k, n] MatMul (566 MB of float32 weights, far
    past the caches): the most a batch-1 decode step can stream on this machine."""
    from onnx import helper, numpy_helper, TensorProto
    w = np.random.default_rng(1).random((k, n), np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = {"x": np.ones((1, k), np.float32)}
    for _ in range(3):
        s.run(None, x)
    t = time.perf_counter()
    for _ in range(10):
        s.run(None, x)
    return w.nbytes * 10 / (time.perf_counter() - t) / 1e9

results = {n: {"prefill_ms": [], "decode_b1": [], "decode_b8": [], "plain_b1": [], "genai_b1": []}
           for n in sessions}
for n in sessions:  # warm-up
    prefill(n, 1); decode_all([n], 1, 0, new=8, blocks=1)
gemv = gemv_gb_per_s()
for r in range(spec["runs"]):
    # alternating: every model once per round, the order reversed every other round
    order = list(sessions) if r % 2 == 0 else list(sessions)[::-1]
    for n in order:
        results[n]["prefill_ms"].append(prefill(n, 1))
    for batch in [1, 8]:
        for n, v in decode_all(list(sessions), batch, r).items():
            results[n][f"decode_b{batch}"].append(v)
    for n in order:
        time.sleep(0.03)
        results[n]["plain_b1"].append(decode_all([n], 1, 0, blocks=1)[n])
    for n in order:
        results[n]["genai_b1"].append(genai_decode(n))
if spec["profile"]:  # separate sessions: profiling slows every node down
    for n in list(sessions):
        sessions[n] = open_session(n, True)
        prefill(n, 1); decode_all([n], 1, 0, new=32, blocks=1)
        results[n]["profile"] = sessions[n].end_profiling()
print(json.dumps({"models": results, "gemv_gb_per_s": gemv}))
'''


def op_histogram(path, py):
    code = ("import onnx, sys, collections, json; m = onnx.load(sys.argv[1], load_external_data=False);"
            "print(json.dumps(collections.Counter(n.op_type for n in m.graph.node).most_common()))")
    return json.loads(run([py, "-c", code, path]))


def profile_summary(path):
    with open(path) as f:
        events = json.load(f)
    by_op = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            by_op[op] = by_op.get(op, 0) + e["dur"]
    total = sum(by_op.values()) or 1
    return sorted(((op, us / total) for op, us in by_op.items()), key=lambda x: -x[1])[:8]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depthc", default=os.path.join(ROOT, "target/release/depthc"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--precision", choices=["fp32", "int4"], default="fp32",
                    help="fp32, or int4 (the builder's -p int4; depthc's --dtype int4)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--keep", help="keep the exported models in this folder")
    a = ap.parse_args()
    py = pins.venv_python(*PACKAGES)
    work = a.keep or tempfile.mkdtemp(prefix="depthc-vs-builder-")
    os.makedirs(work, exist_ok=True)
    try:
        t0 = time.time()
        models = export(work, a.depthc, py, a.precision)
        print(f"exported {len(models)} models in {time.time() - t0:.0f} s", flush=True)
        optimized = os.path.join(work, "portable-optimized.onnx")
        spec = {"models": models, "runs": a.runs, "optimized": optimized,
                "profile": a.profile, "profile_dir": work}
        out = json.loads(run([py, "-c", MEASURE, json.dumps(spec)]))
        res = out["models"]
        metrics = ["prefill_ms", "decode_b1", "decode_b8", "plain_b1", "genai_b1"]
        med = {n: {k: statistics.median(r[k]) for k in metrics} for n, r in res.items()}
        # Each round's ratio against the builder's run of the same round (>1 is faster),
        # so that the machine's drift between rounds cancels.
        ratios = {n: {k: [(b / x if k == "prefill_ms" else x / b)
                          for x, b in zip(r[k], res["builder"][k])] for k in metrics}
                  for n, r in res.items()}
        print(f"\nSmolLM2-135M, ONNX Runtime CPU, {a.precision} weights, {a.runs} alternating rounds. Each cell: "
              "median over rounds, then the median [min-max] of the per-round ratio against "
              "the onnxruntime-genai builder's export of the same round (>1 is faster)")
        heads = ["prefill ms", "decode b1 tok/s", "decode b8 tok/s", "plain b1 tok/s",
                 "genai b1 tok/s"]
        print(f"{'model':28} {'MB on disk':>10} " + " ".join(f"{h:>30}" for h in heads))
        for n in res:
            cells = []
            for k in metrics:
                q = ratios[n][k]
                cells.append(f"{med[n][k]:8.1f} x{statistics.median(q):.2f} "
                             f"[{min(q):.2f}-{max(q):.2f}]")
            print(f"{n:28} {size_mb(models[n]):10.1f} " + " ".join(f"{c:>30}" for c in cells))
        # Every model multiplies by the same weights each decode step (pairing regroups
        # them, never drops any): all of depthc's weights but the embedding table, whose
        # Gather reads one row per token.
        streamed = os.path.getsize(os.path.join(models["depthc baseline ort"], "model.onnx_data"))
        if a.precision == "fp32":  # int4: the tied embedding is the LM head's 4-bit rows
            streamed -= 49152 * 576 * 4
        print(f"\none [1, 576] x [576, 245760] MatMul streams {out['gemv_gb_per_s']:.1f} GB/s of "
              f"weights; batch-1 decode streams {streamed / 1e6:.0f} MB a step:")
        for n, m in med.items():
            gbs = streamed * m["decode_b1"] / 1e9
            print(f"  {n:28} {gbs:5.1f} GB/s ({gbs / out['gemv_gb_per_s']:.0%} of the MatMul's)")
        print("\nportable baseline as ONNX Runtime optimises it (op counts):")
        print("  " + ", ".join(f"{op} {c}" for op, c in op_histogram(optimized, py)))
        if a.profile:
            print("\ndecode + prefill time by op (share of kernel time):")
            for n, r in res.items():
                print(f"  {n}: " + ", ".join(f"{op} {s:.0%}" for op, s in profile_summary(r["profile"])))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
