#!/usr/bin/env python3
"""Small, valid seed inputs for the fuzz targets (fuzz/seeds/TARGET/), kept
small so that what the fuzzer derives from them stays small too:
nano Llama GGUF files (F32, F16, Q8_0/Q4_0/Q5_0, and Q4_K/Q6_K blocks of
random bytes), a nano Gemma 3 GGUF with a SentencePiece vocabulary, safetensors files of every dtype depthc reads, the config.json
files of the test fixtures, and plan strings.
Run: pip install numpy gguf==0.19.0 && python fuzz/make_seeds.py
"""

import glob
import json
import os
import shutil
import struct

import numpy as np
from gguf import GGMLQuantizationType as T, GGML_QUANT_SIZES, GGUFWriter, quants

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds")
ROOT = os.path.dirname(HERE)
rng = np.random.default_rng(5)


def gguf(name, hidden, ffn, vocab, qtype=None, down_raw=None):
    path = os.path.join(SEEDS, "gguf", name)
    w = GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(hidden // 2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([chr(0x21 + i) for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(1)

    def add(n, shape, quantise=True):
        a = rng.normal(0, 0.1, shape).astype(np.float32)
        if qtype is None or not quantise:
            w.add_tensor(n, a)
        elif qtype == T.F16:
            w.add_tensor(n, a.astype(np.float16))
        else:
            w.add_tensor(n, quants.quantize(a, qtype), raw_dtype=qtype)

    add("token_embd.weight", (vocab, hidden))
    add("output_norm.weight", (hidden,), False)
    add("blk.0.attn_norm.weight", (hidden,), False)
    add("blk.0.ffn_norm.weight", (hidden,), False)
    add("blk.0.attn_q.weight", (hidden, hidden))
    add("blk.0.attn_k.weight", (hidden // 2, hidden))
    add("blk.0.attn_v.weight", (hidden // 2, hidden))
    add("blk.0.attn_output.weight", (hidden, hidden))
    add("blk.0.ffn_gate.weight", (ffn, hidden))
    add("blk.0.ffn_up.weight", (ffn, hidden))
    if down_raw is None:
        add("blk.0.ffn_down.weight", (hidden, ffn))
    else:  # k-quant blocks of random bytes (rows of `ffn` = 256 elements)
        block, size = GGML_QUANT_SIZES[down_raw]
        raw = rng.integers(0, 256, (hidden, ffn // block * size), dtype=np.uint8)
        w.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=down_raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gemma3(name, hidden=16, ffn=32, vocab=24):
    """A nano `gemma3` GGUF with a SentencePiece (`llama`) vocabulary."""
    path = os.path.join(SEEDS, "gguf", name)
    w = GGUFWriter(path, "gemma3")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_key_length(8)
    w.add_value_length(8)
    w.add_sliding_window(4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama")
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(4)]
    pieces += ["\u2581", "a", "b", "ab", "\u2581a", "  ", "c", "abc", "\u2581ab"]
    pieces += [f"t{i}" for i in range(vocab - len(pieces))]
    w.add_token_list(pieces)
    w.add_token_types([3, 3, 3, 2] + [6] * 4 + [1] * (vocab - 8))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    f32 = lambda *shape: rng.normal(0, 0.1, shape).astype(np.float32)
    w.add_tensor("token_embd.weight", f32(vocab, hidden))
    w.add_tensor("output_norm.weight", f32(hidden) + 1)
    for i in range(2):
        for n, shape in [("attn_q", (16, hidden)), ("attn_k", (8, hidden)), ("attn_v", (8, hidden)),
                         ("attn_output", (hidden, 16)), ("ffn_gate", (ffn, hidden)),
                         ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))]:
            w.add_tensor(f"blk.{i}.{n}.weight", f32(*shape))
        for n, size in [("attn_norm", hidden), ("post_attention_norm", hidden), ("ffn_norm", hidden),
                        ("post_ffw_norm", hidden), ("attn_q_norm", 8), ("attn_k_norm", 8)]:
            w.add_tensor(f"blk.{i}.{n}.weight", f32(size) + 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def safetensors(name, tensors):
    header, blobs, at = {"__metadata__": {"format": "pt"}}, [], 0
    for n, (dtype, shape) in tensors.items():
        size = int(np.prod(shape)) * {"F32": 4, "F16": 2, "BF16": 2}[dtype]
        header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
        blobs.append(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        at += size
    text = json.dumps(header).encode()
    with open(os.path.join(SEEDS, "safetensors_header", name), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


shutil.rmtree(SEEDS, ignore_errors=True)
for t in ["gguf", "safetensors_header", "config_json", "plan"]:
    os.makedirs(os.path.join(SEEDS, t))
gguf("f32", 8, 16, 16)
gguf("f16", 8, 16, 16, T.F16)
gguf("q8_0", 32, 32, 16, T.Q8_0)
gguf("q4_0", 32, 32, 16, T.Q4_0)
gguf("q5_0", 32, 32, 16, T.Q5_0)
gguf("q4_k", 32, 256, 16, T.Q8_0, down_raw=T.Q4_K)
gguf("q6_k", 32, 256, 16, T.Q8_0, down_raw=T.Q6_K)
gemma3("gemma3")
safetensors("f32", {"a": ("F32", [2, 3]), "b": ("F32", [3])})
safetensors("f16_bf16", {"x.weight": ("F16", [4, 2]), "y.weight": ("BF16", [2, 4])})
safetensors("empty_tensor", {"z": ("F32", [0, 4]), "w": ("F16", [1])})
for path in glob.glob(os.path.join(ROOT, "fixtures", "*", "*", "config.json")):
    name = "_".join(path.split(os.sep)[-3:-1])
    shutil.copy(path, os.path.join(SEEDS, "config_json", name))
for i, (layers, spec) in enumerate([(28, "20-21,22-23"), (28, "20..24"), (8, "1+2+3"),
                                    (8, "0-1, 3-4"), (8, "5-3"), (8, "2"), (4, ""),
                                    # Found by the fuzzer: a huge index once allocated its range.
                                    (28, "22-12421242123")]):
    with open(os.path.join(SEEDS, "plan", f"seed{i}"), "wb") as f:
        f.write(bytes([layers - 1]) + spec.encode())
for t in sorted(os.listdir(SEEDS)):
    files = os.listdir(os.path.join(SEEDS, t))
    size = sum(os.path.getsize(os.path.join(SEEDS, t, f)) for f in files)
    print(f"{t}: {len(files)} seeds, {size} bytes")
