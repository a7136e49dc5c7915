"""Optimum's ORTModelForCausalLM loads depthc's output with no option and
generates the reference forward's greedy tokens. Run by
scripts/optimum_check.sh (which makes the virtual environment).

For each folder: `depthc validate DIR --model MODEL --text PROMPT --steps 15
--json` gives the reference's 16 greedy tokens (and checks ONNX Runtime
against it); Optimum tokenizes the same text with the folder's tokenizer and
generates 16 tokens greedily. Exit 1 when any folder differs.
"""
import json
import os
import subprocess
import sys
import tempfile

from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTHC = os.path.join(ROOT, "target", "release", "depthc")
CACHE = os.environ.get("DEPTHC_CACHE", os.path.join(ROOT, ".cache"))
SMOLLM2 = os.path.join(CACHE, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
TINY = os.path.join(ROOT, "fixtures", "tiny_llama", "tiny.q8_0.gguf")
PROMPT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind"
N = 16


def depthc(*args):
    r = subprocess.run([DEPTHC, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"depthc {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def reference(folder, model, prompt_file):
    v = json.loads(depthc("validate", folder, "--model", model, "--text", prompt_file,
                          "--steps", str(N - 1), "--json"))
    want = v["tokens_reference"][:N]
    return want, v


def optimum(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    model = ORTModelForCausalLM.from_pretrained(folder)
    inputs = tok(PROMPT, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=N, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def main():
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = os.path.join(tmp, "prompt.txt")
        with open(prompt_file, "w") as f:
            f.write(PROMPT)
        compiled = os.path.join(tmp, "tiny")
        depthc("compile", TINY, "-o", compiled, "--seq-len", "16", "--max-tokens", "256",
               "--protect-first", "0", "--protect-last", "0", "--pairs", "1", "--runs", "1",
               "--steps", "4")
        folders = [(os.path.join(compiled, p), TINY, f"tiny compile/{p}")
                   for p in ("baseline", "compiled")]
        for plan, dtype in (("", "f32"), ("20..24", "f32"), ("20..24", "f16")):
            out = os.path.join(tmp, f"smollm2-{plan or 'original'}-{dtype}")
            depthc("emit", SMOLLM2, "--plan", plan, "--dtype", dtype, "-o", out)
            folders.append((out, SMOLLM2, f"SmolLM2 plan `{plan}` {dtype}"))
        for folder, model, name in folders:
            want, v = reference(folder, model, prompt_file)
            got = optimum(folder)
            eos = json.load(open(os.path.join(folder, "generation_config.json"))).get("eos_token_id")
            eos = eos if isinstance(eos, list) else [eos]
            stop = next((i for i, t in enumerate(want) if t in eos), None)
            if stop is not None:
                want = want[: stop + 1]
            ok = got == want
            print(f"{'ok  ' if ok else 'FAIL'} {name}: optimum {got}")
            if not ok:
                print(f"     reference {want}")
                failures.append(name)
    if failures:
        sys.exit(f"Optimum differs from the reference on: {', '.join(failures)}")
    print("OK: Optimum's ORTModelForCausalLM generates the reference's greedy tokens on every folder")


if __name__ == "__main__":
    main()
