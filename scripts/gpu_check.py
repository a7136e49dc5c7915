#!/usr/bin/env python3
"""One prepared run of depthc on a machine with an NVIDIA GPU: ONNX Runtime's
CUDA provider validates float16 models against the reference forward with no
node left on the CPU, and `depthc bench --device cuda` measures the 6-pair
compiled model against the unmodified one at batch 1 and 8, where depth is
latency. The same benchmark also runs on the machine's CPU cores.

No weights travel: the script writes random-weight checkpoints
(scripts/random_checkpoint.py: numpy, float16 safetensors) with the shapes of
SmolLM2-135M (Llama, 30 layers) and Qwen2.5-1.5B (Qwen2, 28 layers, q/k/v
biases) there, with a word-level tokenizer whose tokens are `t0 t1 ...`; the
prompt is a fixed sequence of them. Random weights give near-uniform logits
whose greedy near-ties float16 rounding flips (seen at the Qwen2.5-1.5B shape
with a spread of 0.2), so the embedding (tied to the LM head) has unit spread,
50 times the other weights': the top logits are then several units apart.

Subcommands:

  prepare --bundle DIR   (here) DIR holds an ONNX Runtime CUDA bundle:
                         libonnxruntime_providers_cuda.so.xz,
                         libonnxruntime.so.VERSION.xz (ONNXRUNTIME
                         of scripts/versions.env),
                         libonnxruntime_providers_shared.so and SHA256SUMS.
                         Puts the CUDA provider in .ortgpu-bundle/ (50 MiB), and
                         libonnxruntime with a stripped, xz-compressed
                         target/release/depthc in .ortgpu-bin/ (10 MiB); both
                         git-ignored.
  unpack                 (on the GPU machine, first) unpacks the provider
                         from .ortgpu-bundle/ into .ortgpu/, checked against
                         SHA256SUMS.
  run                    (on the GPU machine, after unpack) unpacks
                         libonnxruntime and depthc from .ortgpu-bin/ into
                         .ortgpu/, makes the checkpoints, emits baseline and
                         compiled models in float16 in both op modes and both
                         forms, validates each with `--device cuda --strict`,
                         benchmarks, prints one table and writes
                         $OUT/gpu_check.json when OUT is set.
  run --dry-run          (here) the same on tiny shapes with the CPU provider:
                         a test of the script itself (tests/gpu_check.rs).
  run --cpu              (here) the real shapes with the CPU provider.

The two folders are made small enough to copy separately (50 MiB and 10 MiB)
to a machine that takes at most 64 MiB at a time; .ortgpu/ is git-ignored.
The steps: docs/GPU.md.
"""
import argparse
import glob
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, ".ortgpu-bundle")
ORT_DIR = os.path.join(ROOT, ".ortgpu")
BIN_DIR = os.path.join(ROOT, ".ortgpu-bin")
ORT_LIB = f"libonnxruntime.so.{pins.pin('onnxruntime')}"

# name: (architecture, layers, hidden, heads, kv heads, FFN, vocabulary, RoPE base, RMS eps, 6-pair plan)
SHAPES = {
    "smollm2-135m": ("llama", 30, 576, 9, 3, 1536, 49152, 1e5, 1e-5,
                     "12-13,14-15,17-18,21-22,24-25,26-27"),
    "qwen2.5-1.5b": ("qwen2", 28, 1536, 12, 2, 8960, 151936, 1e6, 1e-6,
                     "8-9,10-11,12-13,14-15,16-17,18-19"),
}
DRY_SHAPES = {
    "tiny-llama": ("llama", 8, 64, 4, 2, 128, 512, 1e5, 1e-5, "2-3,4-5"),
    "tiny-qwen2": ("qwen2", 8, 64, 4, 2, 128, 512, 1e6, 1e-6, "2-3,4-5"),
}
PROMPT_TOKENS = 64


def log(msg):
    print(msg, flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def prepare(args):
    names = ["libonnxruntime_providers_cuda.so.xz", ORT_LIB + ".xz",
             "libonnxruntime_providers_shared.so", "SHA256SUMS"]
    missing = [n for n in names if not os.path.isfile(os.path.join(args.bundle, n))]
    if missing:
        sys.exit(f"{args.bundle}: not an ONNX Runtime CUDA bundle, missing {', '.join(missing)}")
    binary = os.path.join(ROOT, "target", "release", "depthc")
    if not os.path.isfile(binary):
        sys.exit(f"{binary} missing: cargo build --release first")
    # The CUDA provider in the first call; ONNX Runtime and depthc in the second.
    for folder, files in ((BUNDLE, names[0:1] + names[2:]), (BIN_DIR, names[1:2] + names[3:])):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for n in files:
            shutil.copy(os.path.join(args.bundle, n), folder)
    stripped = os.path.join(BIN_DIR, "depthc")
    shutil.copy(binary, stripped)
    subprocess.run(["strip", stripped], check=True)
    with open(stripped, "rb") as src, lzma.open(stripped + ".xz", "wb", preset=9) as dst:
        shutil.copyfileobj(src, dst)
    os.remove(stripped)
    size = lambda d: sum(os.path.getsize(p) for p in glob.glob(d + "/*")) / 2**20
    log(f"prepared {BUNDLE} ({size(BUNDLE):.1f} MiB) and {BIN_DIR} ({size(BIN_DIR):.1f} MiB)")


def unpack(_args, folder=BUNDLE):
    """Every file of `folder` into .ortgpu/, xz-decompressed, checked against
    its SHA256SUMS where listed there."""
    sums = {}
    with open(os.path.join(folder, "SHA256SUMS")) as f:
        for line in f:
            digest, name = line.split()
            sums[name.lstrip("*")] = digest
    os.makedirs(ORT_DIR, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        name = os.path.basename(path)
        if name == "SHA256SUMS":
            continue
        out = os.path.join(ORT_DIR, name[:-3] if name.endswith(".xz") else name)
        opener = lzma.open if name.endswith(".xz") else open
        with opener(path, "rb") as src, open(out + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(out + ".part", out)
        want = sums.get(os.path.basename(out))
        got = sha256(out)
        if want and want != got:
            sys.exit(f"{out}: sha256 {got} is not {want} from SHA256SUMS")
        os.chmod(out, 0o755)
        log(f"unpacked {out} ({os.path.getsize(out) / 2**20:.1f} MiB{', sha256 ok' if want else ''})")


def cuda_library_path():
    """The lib folders of the nvidia-* Python packages (cuBLAS, cuDNN, cudart)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "*", "lib")))
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "lib")))
    return dirs


def make_checkpoint(path, shape):
    """A Hugging Face folder with random float16 weights (scripts/random_checkpoint.py,
    its float16 pool): config.json, model.safetensors and a word-level tokenizer.json."""
    import random_checkpoint  # numpy: only here, prepare and unpack run without it
    arch, layers, hidden, heads, kv, ffn, vocab, theta, eps, _ = shape
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]],
        "model_type": arch, "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": hidden // heads, "vocab_size": vocab, "rope_theta": theta, "rms_norm_eps": eps,
        "tie_word_embeddings": True, "max_position_embeddings": 2048, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
    }
    # The embedding (tied to the LM head) has unit spread: see the top of this file.
    tensors = random_checkpoint.decoder_tensors(layers, hidden, heads, kv, ffn, vocab,
                                                qkv_bias=arch == "qwen2", embed_std=1.0)
    random_checkpoint.write_checkpoint(path, config, tensors, indent=1, dtype="F16", fill="pool", seed=0)


def run_depthc(binary, env, *args):
    t0 = time.time()
    r = subprocess.run([binary, *args], capture_output=True, text=True, env=env)
    return r, time.time() - t0


def run(args):
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    local = args.dry_run or args.cpu
    device = "cpu" if local else "cuda"
    env = dict(os.environ)
    if local:
        binary = args.depthc or os.path.join(ROOT, "target", "release", "depthc")
        cache = os.environ.get("DEPTHC_CACHE") or os.path.join(ROOT, ".cache")
        lib = args.ort_lib or (os.path.join(ORT_DIR, ORT_LIB) if os.path.isfile(os.path.join(ORT_DIR, ORT_LIB))
                               else os.path.join(cache, "onnxruntime", ORT_LIB))
    else:
        binary = os.path.join(ORT_DIR, "depthc")
        if not os.path.isfile(binary):
            unpack(args, BIN_DIR)
        lib = args.ort_lib or os.path.join(ORT_DIR, ORT_LIB)
        env["LD_LIBRARY_PATH"] = ":".join([ORT_DIR, *cuda_library_path(), env.get("LD_LIBRARY_PATH", "")])
    if not os.path.isfile(lib):
        sys.exit(f"ONNX Runtime library {lib} missing (run `unpack` first, or pass --ort-lib)")
    env["ORT_DYLIB_PATH"] = lib
    log(f"depthc {binary}\nonnxruntime {lib}\ndevice {device}")
    work = args.work or tempfile.mkdtemp(prefix="depthc-gpu-")
    results = {"device": device, "dry_run": args.dry_run, "models": {}}
    rows = []
    failures = []
    t_start = time.time()
    for name, shape in shapes.items():
        if args.models and name not in args.models:
            continue
        plan = shape[-1]
        ckpt = os.path.join(work, name)
        t0 = time.time()
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            make_checkpoint(ckpt, shape)
        log(f"\n{name}: checkpoint in {time.time() - t0:.1f} s")
        prompt = os.path.join(work, f"{name}.prompt.txt")
        with open(prompt, "w") as f:
            f.write(" ".join(f"t{(i * 7919 + 13) % shape[6]}" for i in range(PROMPT_TOKENS)))
        entry = results["models"][name] = {"plan": plan, "validation": {}, "bench": {}}
        for ops in args.ops:
            variants = [("baseline", "", "fused")] + [(f"compiled-{f}", plan, f) for f in args.forms]
            dirs = {}
            for label, p, form in variants:
                out = os.path.join(work, f"{name}-{ops}-{label}")
                shutil.rmtree(out, ignore_errors=True)
                r, secs = run_depthc(binary, env, "emit", ckpt, "--plan", p, "-o", out, "--form", form,
                                     "--ops", ops, "--dtype", "f16")
                if r.returncode != 0:
                    failures.append(f"{name} {ops} {label}: emit: {r.stderr.strip()}")
                    continue
                vargs = ["validate", out, "--model", ckpt, "--text", prompt, "--device", device,
                         "--json"] + (["--strict"] if device == "cuda" else [])
                r, vsecs = run_depthc(binary, env, *vargs)
                try:
                    v = json.loads(r.stdout)
                except json.JSONDecodeError:
                    v = {"error": r.stderr.strip()}
                entry["validation"][f"{ops}/{label}"] = v
                ok = r.returncode == 0
                logits = next((o for o in v.get("outputs", []) if o.get("name") == "logits"), {})
                log(f"  {ops:<8} {label:<18} emit {secs:5.1f} s, validate {vsecs:5.1f} s: "
                    f"{'ok' if ok else 'FAILED'} (logits max rel {logits.get('max_rel', float('nan')):.2e}"
                    f", tokens {'agree' if v.get('tokens_agree') else 'differ'})")
                if not ok:
                    failures.append(f"{name} {ops} {label}: validate: {r.stderr.strip() or v}")
                dirs[label] = out
            if "baseline" not in dirs:
                continue
            for label in [l for l in dirs if l != "baseline"]:
                benches = [(device, b) for b in args.batches]
                if not local and args.cpu_bench and name == "smollm2-135m":
                    benches.append(("cpu", 1))
                for dev, batch in benches:
                    bargs = ["bench", dirs["baseline"], dirs[label], "--batch", str(batch), "--device", dev,
                             "--runs", str(args.runs), "--json"]
                    if dev == "cpu":
                        bargs += ["--decode-tokens", "32", "--threads", str(os.cpu_count())]
                    r, secs = run_depthc(binary, env, *bargs)
                    if r.returncode != 0:
                        failures.append(f"{name} {ops} {label} {dev} b{batch}: bench: {r.stderr.strip()}")
                        continue
                    b = json.loads(r.stdout)
                    entry["bench"][f"{ops}/{label}/{dev}/b{batch}"] = b
                    rows.append((name, ops, label.removeprefix("compiled-"), dev, batch,
                                 b["a"]["prefill_ms"], b["b"]["prefill_ms"], b["prefill_speedup"],
                                 b["a"]["decode_tokens_per_s"], b["b"]["decode_tokens_per_s"],
                                 b["decode_speedup"], secs))
    results["failures"] = failures
    results["seconds"] = time.time() - t_start
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            json.dump(results, f, indent=1)
    log(f"\n6 pairs, float16, compiled (B) against unmodified (A); median of {args.runs} runs; "
        f"prefill 128 tokens, decode 128 (CPU rows: 32) after 32")
    log(f"{'model':<14} {'ops':<8} {'form':<9} {'dev':<4} {'b':>2} {'A pre ms':>9} {'B pre ms':>9} "
        f"{'pre x':>6} {'A tok/s':>9} {'B tok/s':>9} {'dec x':>6}")
    for r in rows:
        log(f"{r[0]:<14} {r[1]:<8} {r[2]:<9} {r[3]:<4} {r[4]:>2} {r[5]:>9.2f} {r[6]:>9.2f} {r[7]:>6.3f} "
            f"{r[8]:>9.1f} {r[9]:>9.1f} {r[10]:>6.3f}")
    log(f"total {results['seconds']:.0f} s")
    if failures:
        log("\nFAILURES:\n" + "\n".join(failures))
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="(here) bundle and binary into .ortgpu-bundle/ and .ortgpu-bin/")
    p.add_argument("--bundle", required=True, help="folder of an ONNX Runtime CUDA bundle")
    sub.add_parser("unpack", help="(there) .ortgpu-bundle/ into .ortgpu/")
    p = sub.add_parser("run", help="checkpoints, emit, validate, bench, table")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU provider: test the script here")
    p.add_argument("--cpu", action="store_true", help="the real shapes with the CPU provider (slow)")
    p.add_argument("--ort-lib", help="libonnxruntime to use (default: .ortgpu/, or .cache/ in a dry run)")
    p.add_argument("--depthc", help="the depthc binary of a run here (default: target/release/depthc)")
    p.add_argument("--work", help="folder for checkpoints and models (default: a new temporary one)")
    p.add_argument("--models", nargs="*", help="subset of the shapes")
    p.add_argument("--ops", nargs="*", default=["portable", "ort"])
    p.add_argument("--forms", nargs="*", default=["fused", "branches"])
    p.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-cpu-bench", dest="cpu_bench", action="store_false",
                   help="skip the benchmark on the machine's CPU cores")
    args = ap.parse_args()
    {"prepare": prepare, "unpack": unpack, "run": run}[args.command](args)


if __name__ == "__main__":
    main()
