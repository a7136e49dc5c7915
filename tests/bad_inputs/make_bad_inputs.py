#!/usr/bin/env python3
"""Writes the bad-input corpus of tests/bad_inputs.rs: every case directory under
`cases/` and the manifest `cases.json` that says, for each case, the command to run,
what the one-line error must mention (what, where, and the fix when there is one),
and that nothing may be left behind.

The cases are mutations of one micro Llama (4 layers, hidden 32, 4 query / 2 KV
heads, FFN 48, vocab 64; random weights from a fixed seed), written twice: as a
Hugging Face directory (f32 safetensors, no tokenizer) and as a GGUF file with a
single-character BPE vocabulary. Two control cases compile each base model and
must succeed, so a broken base cannot pass for a good error.

Placeholders in `args`: {cases} is this folder's `cases/`, {out} a path in a fresh
temporary directory that must still not exist after the run.

Run from anywhere (needs numpy and gguf: `pip install numpy gguf==0.19.0`):
    python tests/bad_inputs/make_bad_inputs.py
"""

import json
import os
import shutil
import struct

import numpy as np
from gguf import GGUFWriter

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "cases")

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 64, 32, 4, 2, 8, 48, 4

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Fast search flags for the micro model: the errors under test come before the
# search, the control cases must finish in seconds.
FAST = ["--seq-len", "16", "--max-tokens", "256", "--protect-first", "0",
        "--protect-last", "0", "--pairs", "1", "--runs", "1", "--steps", "4"]


def weights():
    rng = np.random.default_rng(20250202)
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (VOCAB, HIDDEN))}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, HIDDEN)
        w[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.15, (HEADS * HEAD_DIM, HIDDEN))
        w[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.15, (KV_HEADS * HEAD_DIM, HIDDEN))
        w[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.15, (KV_HEADS * HEAD_DIM, HIDDEN))
        w[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.15, (HIDDEN, HEADS * HEAD_DIM))
        w[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, HIDDEN)
        w[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.15, (FFN, HIDDEN))
        w[p + "mlp.up_proj.weight"] = rng.normal(0, 0.15, (FFN, HIDDEN))
        w[p + "mlp.down_proj.weight"] = rng.normal(0, 0.15, (HIDDEN, FFN))
    w["model.norm.weight"] = 1 + rng.normal(0, 0.1, HIDDEN)
    w["lm_head.weight"] = rng.normal(0, 0.3, (VOCAB, HIDDEN))
    return {k: v.astype(np.float32) for k, v in w.items()}


def safetensors_bytes(tensors, header_edit=None):
    """The safetensors encoding; `header_edit(header)` may change the header dict."""
    header, blobs, at = {}, [], 0
    for name, a in tensors.items():
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [at, at + len(b)]}
        blobs.append(b)
        at += len(b)
    if header_edit:
        header_edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "w" if isinstance(data, str) else "wb"
    with open(path, mode) as f:
        f.write(data)


def hf_dir(name, config=CONFIG, st=None):
    d = os.path.join(CASES, name)
    write(os.path.join(d, "config.json"), json.dumps(config, indent=2) + "\n")
    write(os.path.join(d, "model.safetensors"), st if st is not None else safetensors_bytes(W))
    return d


def permute(w, n_head):  # llama.cpp's q/k row order
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_bytes():
    path = os.path.join(CASES, ".base.gguf.tmp")
    w = GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([chr(0x21 + i) for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", W["model.embed_tokens.weight"].astype(np.float16))
    w.add_tensor("output_norm.weight", W["model.norm.weight"])
    w.add_tensor("output.weight", W["lm_head.weight"].astype(np.float16))
    for i in range(LAYERS):
        for hf, gg in GGUF_NAMES.items():
            a = W[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                a = permute(a, HEADS)
            elif gg == "attn_k":
                a = permute(a, KV_HEADS)
            w.add_tensor(f"blk.{i}.{gg}.weight", a.astype(np.float16) if a.ndim == 2 else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f:
        data = f.read()
    os.remove(path)
    return data


def gguf_type_at(data, tensor):
    """Byte offset of `tensor`'s ggml type in the tensor table (name, n_dims, dims, type)."""
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims


W = weights()
MANIFEST = []


def case(name, about, args, expect, ok=False):
    MANIFEST.append({"name": name, "about": about, "args": args, "expect": expect, "ok": ok})


def compile_args(model, *extra, out="{out}"):
    return ["compile", model, "-o", out, *FAST, *extra]


def main():
    shutil.rmtree(CASES, ignore_errors=True)
    os.makedirs(CASES)
    ids = np.random.default_rng(7).integers(3, VOCAB, 600).astype(np.int32)
    np.save(os.path.join(CASES, "tokens.npy"), ids)
    tokens = "{cases}/tokens.npy"

    # ---- the two valid bases (controls) ------------------------------------------
    hf_dir("base_hf")
    base_gguf = gguf_bytes()
    write(os.path.join(CASES, "base.gguf"), base_gguf)
    case("control_hf", "the valid Hugging Face base compiles",
         compile_args("{cases}/base_hf", "--calib", tokens), [], ok=True)
    case("control_gguf", "the valid GGUF base compiles (built-in calibration text)",
         compile_args("{cases}/base.gguf"), [], ok=True)

    # ---- safetensors ---------------------------------------------------------------
    good = safetensors_bytes(W)
    hf_dir("st_truncated_header", st=good[:8 + 40])
    case("st_truncated_header", "the file ends inside its JSON header",
         compile_args("{cases}/st_truncated_header", "--calib", tokens),
         ["st_truncated_header/model.safetensors", "header length", "exceeds the file size"])

    hf_dir("st_header_past_end", st=struct.pack("<Q", 1 << 40) + good[8:])
    case("st_header_past_end", "the header length points past the end of the file",
         compile_args("{cases}/st_header_past_end", "--calib", tokens),
         ["st_header_past_end/model.safetensors", "header length 1099511627776", "exceeds the file size"])

    def overlap(h):
        h["model.layers.1.self_attn.v_proj.weight"]["data_offsets"] = \
            h["model.layers.1.self_attn.k_proj.weight"]["data_offsets"]
    hf_dir("st_overlapping_offsets", st=safetensors_bytes(W, overlap))
    case("st_overlapping_offsets", "two tensors claim the same bytes",
         compile_args("{cases}/st_overlapping_offsets", "--calib", tokens),
         ["st_overlapping_offsets/model.safetensors", "model.layers.1.self_attn", "overlap"])

    def out_of_bounds(h):
        b, e = h["lm_head.weight"]["data_offsets"]
        h["lm_head.weight"]["data_offsets"] = [b + 4096, e + 4096]
    hf_dir("st_offsets_out_of_bounds", st=safetensors_bytes(W, out_of_bounds))
    case("st_offsets_out_of_bounds", "a tensor's data_offsets end past the data",
         compile_args("{cases}/st_offsets_out_of_bounds", "--calib", tokens),
         ["st_offsets_out_of_bounds/model.safetensors", "lm_head.weight", "exceed the"])

    def dtype_mismatch(h):
        h["model.layers.2.mlp.up_proj.weight"]["dtype"] = "F16"
    hf_dir("st_dtype_size_mismatch", st=safetensors_bytes(W, dtype_mismatch))
    case("st_dtype_size_mismatch", "F16 declared over F32 bytes: byte count does not match the shape",
         compile_args("{cases}/st_dtype_size_mismatch", "--calib", tokens),
         ["st_dtype_size_mismatch/model.safetensors", "model.layers.2.mlp.up_proj.weight",
          "6144 bytes stored for shape [48, 32] F16, expected 3072"])

    def int_dtype(h):
        h["model.norm.weight"]["dtype"] = "I32"
    hf_dir("st_unsupported_dtype", st=safetensors_bytes(W, int_dtype))
    case("st_unsupported_dtype", "an integer tensor where a float weight belongs",
         compile_args("{cases}/st_unsupported_dtype", "--calib", tokens),
         ["st_unsupported_dtype/model.safetensors", "model.norm.weight", "unsupported dtype I32"])

    # ---- GGUF ----------------------------------------------------------------------
    write(os.path.join(CASES, "gguf_bad_magic.gguf"), b"GGUX" + base_gguf[4:])
    case("gguf_bad_magic", "the first four bytes are not GGUF",
         compile_args("{cases}/gguf_bad_magic.gguf"),
         ["gguf_bad_magic.gguf", "not a GGUF file"])

    write(os.path.join(CASES, "gguf_version_1.gguf"), base_gguf[:4] + struct.pack("<I", 1) + base_gguf[8:])
    case("gguf_unsupported_version", "GGUF version 1 (depthc reads 2 and 3)",
         compile_args("{cases}/gguf_version_1.gguf"),
         ["gguf_version_1.gguf", "GGUF version 1 is not supported (2 or 3)"])

    write(os.path.join(CASES, "gguf_truncated_data.gguf"), base_gguf[:-3000])
    case("gguf_truncated_data", "the file ends inside the tensor data",
         compile_args("{cases}/gguf_truncated_data.gguf"),
         ["gguf_truncated_data.gguf", "truncated file?"])

    unknown = bytearray(base_gguf)
    at = gguf_type_at(base_gguf, "blk.1.ffn_up.weight")
    unknown[at:at + 4] = struct.pack("<I", 99)
    write(os.path.join(CASES, "gguf_unknown_quant_type.gguf"), bytes(unknown))
    case("gguf_unknown_quant_type", "a tensor of ggml type 99, which does not exist",
         compile_args("{cases}/gguf_unknown_quant_type.gguf"),
         ["gguf_unknown_quant_type.gguf", "blk.1.ffn_up.weight", "99"])

    # ---- config.json ---------------------------------------------------------------
    d = hf_dir("config_not_json")
    write(os.path.join(d, "config.json"), '{"architectures": ["LlamaForCausalLM"], "hidden_size": 32,\n')
    case("config_not_json", "config.json is cut off mid-object",
         compile_args("{cases}/config_not_json", "--calib", tokens),
         ["config_not_json/config.json", "JSON"])

    hf_dir("config_missing_field", config={k: v for k, v in CONFIG.items() if k != "num_attention_heads"})
    case("config_missing_field", "num_attention_heads is absent",
         compile_args("{cases}/config_missing_field", "--calib", tokens),
         ["config_missing_field/config.json", "num_attention_heads"])

    hf_dir("config_unknown_architecture", config=dict(CONFIG, architectures=["GPTNeoXForCausalLM"]))
    case("config_unknown_architecture", "an architecture depthc does not implement",
         compile_args("{cases}/config_unknown_architecture", "--calib", tokens),
         ["config_unknown_architecture/config.json", "GPTNeoXForCausalLM", "LlamaForCausalLM"])

    hf_dir("config_kv_heads_not_dividing", config=dict(CONFIG, num_key_value_heads=3))
    case("config_kv_heads_not_dividing", "4 query heads cannot share 3 KV heads",
         compile_args("{cases}/config_kv_heads_not_dividing", "--calib", tokens),
         ["config_kv_heads_not_dividing/config.json", "num_attention_heads 4", "num_key_value_heads 3"])

    no_head_dim = {k: v for k, v in CONFIG.items() if k != "head_dim"}
    hf_dir("config_hidden_not_dividing", config=dict(no_head_dim, num_attention_heads=3, num_key_value_heads=3))
    case("config_hidden_not_dividing", "hidden 32 is not a multiple of 3 heads and no head_dim is given",
         compile_args("{cases}/config_hidden_not_dividing", "--calib", tokens),
         ["config_hidden_not_dividing/config.json", "hidden_size 32", "num_attention_heads 3"])

    # ---- tokenizer and calibration ---------------------------------------------------
    case("missing_tokenizer", "text calibration for a model directory without tokenizer.json",
         compile_args("{cases}/base_hf"),
         ["base_hf", "no tokenizer", ".npy"])

    write(os.path.join(CASES, "calib_empty.txt"), "")
    case("calib_empty", "an empty calibration text",
         compile_args("{cases}/base.gguf", "--calib", "{cases}/calib_empty.txt"),
         ["calib_empty.txt", "empty"])

    write(os.path.join(CASES, "calib_short.txt"), "ABC")
    case("calib_short", "3 tokens of calibration for 16-token windows",
         compile_args("{cases}/base.gguf", "--calib", "{cases}/calib_short.txt"),
         ["calib_short.txt", "3 tokens", "--seq-len 16"])

    case("calib_missing", "a calibration path that does not exist",
         compile_args("{cases}/base.gguf", "--calib", "{cases}/no-such-text.txt"),
         ["no-such-text.txt"])

    # ---- plans -----------------------------------------------------------------------
    for name, plan, expect in [
        ("plan_overlap", "0-1,1-2", ["plan `0-1,1-2`", "layer 1 is in two groups"]),
        ("plan_out_of_range", "3-4", ["plan `3-4`", "layer 4 is out of range", "0 to 3"]),
        ("plan_non_adjacent", "0+2", ["plan `0+2`", "not consecutive", "layer 1"]),
        ("plan_single_layer", "2", ["plan `2`", "not a group", "2-3"]),
        ("plan_malformed", "1-x", ["plan `1-x`", "`x` is not a layer index"]),
    ]:
        case(name, f"the plan `{plan}`", ["emit", "{cases}/base.gguf", "--plan", plan, "-o", "{out}"], expect)

    # ---- outputs ---------------------------------------------------------------------
    write(os.path.join(CASES, "output_under_file", "a-file"), "a file, not a directory\n")
    case("output_under_file", "the output's parent is a regular file",
         compile_args("{cases}/base.gguf", out="{cases}/output_under_file/a-file/out"),
         ["output_under_file/a-file", "not a directory"])

    write(os.path.join(CASES, "output_exists", "existing", "keep.txt"), "the user's file\n")
    case("output_exists", "the output directory exists already (it must stay untouched)",
         compile_args("{cases}/base.gguf", out="{cases}/output_exists/existing"),
         ["output_exists/existing", "already exists", "--force"])

    case("output_in_proc", "an output path the kernel refuses to create",
         ["emit", "{cases}/base.gguf", "-o", "/proc/depthc-out"],
         ["/proc/depthc-out"])

    # ---- non-finite activations --------------------------------------------------------
    inf = dict(W)
    down = inf["model.layers.2.mlp.down_proj.weight"].copy()
    down[5, :] = np.float32(3e38)
    inf["model.layers.2.mlp.down_proj.weight"] = down
    hf_dir("nonfinite_layer_2", st=safetensors_bytes(inf))
    case("nonfinite_layer_2", "layer 2's MLP overflows float32: the original model is not finite",
         compile_args("{cases}/nonfinite_layer_2", "--calib", tokens),
         ["nonfinite_layer_2", "non-finite", "layer 2", "mlp"])

    with open(os.path.join(HERE, "cases.json"), "w") as f:
        json.dump(MANIFEST, f, indent=1)
        f.write("\n")
    print(f"{len(MANIFEST)} cases in {CASES}")


if __name__ == "__main__":
    main()
