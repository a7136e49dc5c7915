"""Full-sequence forward speed of depthc's reference forward against PyTorch fp32.

Both run the real SmolLM2-135M model (dequantised to f32) on the same 1 x N token ids,
in one run of this script, on the same machine, with 2 threads each. Prints tokens/s of
each, the ratio (target: depthc >= 1.3x PyTorch), and depthc's peak RSS against the size
of its f32 weights (target: <= 1.5x).

Needs a release build (`cargo build --release`) and `scripts/setup.sh`; runs in the shared
virtual environment .cache/venv, adding torch, transformers and accelerate to it when missing
(scripts/venv.sh):
  python3 benches/forward_vs_pytorch.py [--tokens 256] [--repeats 5]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(root, "scripts"))
import pins  # noqa: E402  (scripts/pins.py)

cache = os.environ.get("DEPTHC_CACHE", os.path.join(root, ".cache"))
model_dir = os.path.join(cache, "smollm2")
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--tokens", type=int, default=256)
ap.add_argument("--repeats", type=int, default=5)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()

# Run in the shared virtual environment, with what PyTorch's side needs.
python = pins.venv_python("torch", "transformers", "accelerate")
if os.path.realpath(sys.prefix) != os.path.realpath(os.path.dirname(os.path.dirname(python))):
    os.execv(python, [python, *sys.argv])

# depthc: a separate process so that its peak RSS is its own.
env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
out = subprocess.run(
    [os.path.join(root, "target/release/depthc"), "bench-forward", os.path.join(model_dir, gguf),
     "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--json"],
    env=env, check=True, capture_output=True, text=True,
)
ours = json.loads(out.stdout)

import torch  # noqa: E402  (imported after depthc ran, so its threads do not compete)
from transformers import AutoModelForCausalLM  # noqa: E402

torch.set_num_threads(args.threads)
model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf, torch_dtype=torch.float32)
model.eval()
vocab = model.config.vocab_size
# The same ids as `depthc bench-forward`.
ids = torch.tensor([[(i * 7919 + 13) % vocab for i in range(args.tokens)]])
times = []
with torch.inference_mode():
    for rep in range(args.repeats + 1):
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        if rep > 0:
            times.append(time.perf_counter() - t0)
torch_s = statistics.median(times)
torch_tps = args.tokens / torch_s

print(f"forward 1x{args.tokens}, {args.threads} threads, median of {args.repeats}")
print(f"  depthc   {ours['median_s'] * 1e3:8.1f} ms  {ours['tokens_per_s']:8.1f} tokens/s")
print(f"  pytorch  {torch_s * 1e3:8.1f} ms  {torch_tps:8.1f} tokens/s  (torch {torch.__version__})")
print(f"  ratio    {ours['tokens_per_s'] / torch_tps:.2f}x  (target >= 1.3x)")
rss, weights = ours["peak_rss_bytes"], ours["f32_weight_bytes"]
print(f"  depthc peak RSS {rss / 2**20:.1f} MiB = {rss / weights:.2f}x the f32 weights "
      f"({weights / 2**20:.1f} MiB; target <= 1.5x)")
sys.exit(0)
