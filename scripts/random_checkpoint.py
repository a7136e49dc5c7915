"""Random-weight Hugging Face checkpoints of Llama-style decoders, numpy only.

A folder with config.json, model.safetensors written one tensor at a time (so
that a 7B-sized file never sits in memory) and a word-level tokenizer.json
whose token ``t<i>`` is id i, split on whitespace: a prompt is a line of
``t<i>`` words. Used by scripts/scale_check.py (bfloat16, Llama-2-7B's shapes;
scripts/compile_7b.py through it) and scripts/gpu_check.py (float16, the
shapes of SmolLM2-135M and Qwen2.5-1.5B).

Two ways to fill the weights, both seeded:

  draws  every value its own normal draw (float32, scaled, then rounded to
         the file's type), generated in chunks of CHUNK_ELEMS;
  pool   one pool of (1 << 24) + 7 normal values in float16, read cyclically
         from a different place for each tensor and scaled in float16:
         writing 1.5B parameters costs a copy, not 1.5B draws. The pool's
         length is no multiple of any row, so no two rows are equal.

Norm weights (std None) are ones.
"""

import json
import os

import numpy as np

CHUNK_ELEMS = 1 << 24  # draws: 16M float32 = 64 MiB per generated chunk
POOL_ELEMS = (1 << 24) + 7


def decoder_tensors(layers, hidden, heads, kv_heads, ffn, vocab, *, qkv_bias=False, tied=True,
                    embed_std=0.02, std=0.02):
    """(name, shape, std) in file order; std None for the norm weights (ones).
    qkv_bias: Qwen2's q/k/v biases; tied=False adds an lm_head after the final norm."""
    hd = hidden // heads
    tensors = [("model.embed_tokens.weight", (vocab, hidden), embed_std)]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", (hidden,), None),
            (p + "self_attn.q_proj.weight", (heads * hd, hidden), std),
            (p + "self_attn.k_proj.weight", (kv_heads * hd, hidden), std),
            (p + "self_attn.v_proj.weight", (kv_heads * hd, hidden), std),
            (p + "self_attn.o_proj.weight", (hidden, heads * hd), std),
            (p + "post_attention_layernorm.weight", (hidden,), None),
            (p + "mlp.gate_proj.weight", (ffn, hidden), std),
            (p + "mlp.up_proj.weight", (ffn, hidden), std),
            (p + "mlp.down_proj.weight", (hidden, ffn), std),
        ]
        if qkv_bias:
            tensors += [(p + f"self_attn.{x}_proj.bias", (n * hd,), std)
                        for x, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))]
    tensors.append(("model.norm.weight", (hidden,), None))
    if not tied:
        tensors.append(("lm_head.weight", (vocab, hidden), std))
    return tensors


def to_bf16(x):
    """float32 array -> uint16 bf16 bits, round to nearest even (no NaNs here)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype("<u2")


def _draws(tensors, dtype, seed):
    """Chunks of bytes, tensor after tensor: independent normal draws."""
    rng = np.random.default_rng(seed)
    encode = to_bf16 if dtype == "BF16" else (lambda a: a.astype("<f2"))
    for _, shape, std in tensors:
        total = int(np.prod(shape))
        done = 0
        while done < total:
            n = min(CHUNK_ELEMS, total - done)
            if std is None:
                chunk = np.ones(n, dtype=np.float32)
            else:
                chunk = rng.standard_normal(n, dtype=np.float32)
                chunk *= np.float32(std)
            yield encode(chunk).tobytes()
            done += n


def _pool(tensors, dtype, seed):
    """Chunks of bytes, one a tensor: cyclic reads of one float16 pool."""
    if dtype != "F16":
        raise ValueError("fill='pool' writes float16 only")
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(POOL_ELEMS, np.float32).astype(np.float16)
    for k, (_, shape, std) in enumerate(tensors):
        n = int(np.prod(shape))
        if std is None:
            values = np.ones(n, np.float16)
        else:
            start = (k * 7919 * 104729) % len(pool)
            cycle = np.concatenate([pool[start:], pool[:start]])
            values = np.tile(cycle, -(-n // len(cycle)))[:n] * np.float16(std)
        yield values.tobytes()


def write_safetensors(path, tensors, *, dtype="F16", fill="pool", seed=0, metadata=None, compact=False):
    """Write `tensors` (decoder_tensors' list) as one safetensors file; return
    (file bytes, parameter count). dtype: "F16" or "BF16"; fill: "draws" or
    "pool"; metadata: the header's __metadata__ (none when None); compact:
    the header JSON without spaces."""
    header = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name, shape, _ in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":") if compact else None).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
    chunks = {"draws": _draws, "pool": _pool}[fill](tensors, dtype, seed)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for chunk in chunks:
            f.write(chunk)
    size = os.path.getsize(path)
    assert size == 8 + len(blob) + offset, (size, offset)
    return size, sum(int(np.prod(shape)) for _, shape, _ in tensors)


def write_tokenizer(path, vocab):
    """Minimal WordLevel tokenizer.json: token `t<i>` is id i, split on whitespace."""
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(vocab)}, "unk_token": "t0"},
    }
    with open(path, "w") as f:
        json.dump(tok, f)


def write_checkpoint(folder, config, tensors, *, indent=1, **safetensors):
    """config.json (`config`, indented by `indent`), tokenizer.json (the
    config's vocab_size) and model.safetensors (write_safetensors with the
    keyword arguments given) in `folder`; return (safetensors bytes, parameters)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=indent)
    write_tokenizer(os.path.join(folder, "tokenizer.json"), config["vocab_size"])
    return write_safetensors(os.path.join(folder, "model.safetensors"), tensors, **safetensors)
