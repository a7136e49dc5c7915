#!/usr/bin/env python3
"""Check `--int4-source gguf` against the gguf package's own dequantiser.

    int4_gguf_blocks.py ONNX_DIR GGUF

ONNX_DIR: `depthc emit GGUF --dtype int4 --int4-source gguf` of the unmodified model
(no plan, portable op set: q|k|v are one MatMulNBits, gate|up another). For every
MatMulNBits node, the weight its codes, scales and zero points stand for,
`(code - zero_point) * scale`, is compared with `gguf.quants.dequantize` of the GGUF
tensors it was written from (rows of q and k un-permuted as llama.cpp's converter
permuted them for Llama), over the rows whose GGUF type is 4-bit blocks of 32 (Q4_0,
Q4_1, Q4_K); the other rows were rounded to nearest. Prints one JSON object: rows
checked, the largest difference relative to the tensor's largest magnitude, and how many
nodes carry float zero points.
"""

import json
import os
import sys

import gguf
import numpy as np
import onnx
from onnx import numpy_helper

FOUR_BIT = {"Q4_0", "Q4_1", "Q4_K"}


def main():
    onnx_dir, path = sys.argv[1], sys.argv[2]
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    heads = int(reader.fields["llama.attention.head_count"].parts[-1][0])
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].parts[-1][0])

    def rows_of(name, permute_heads=None):
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            [int(d) for d in reversed(t.shape)])
        if permute_heads:  # GGUF row h*d + 2i + s is HF row h*d + s*d/2 + i
            n, k = w.shape
            d = n // permute_heads
            w = w.reshape(permute_heads, d // 2, 2, k).swapaxes(1, 2).reshape(n, k)
        return w.astype(np.float32), t.tensor_type.name in FOUR_BIT

    model = onnx.load(os.path.join(onnx_dir, "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    checked_rows, worst, with_zero_points = 0, 0.0, 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        n, k, bs = attrs["N"], attrs["K"], attrs["block_size"]
        codes = numpy_helper.to_array(inits[node.input[1]], onnx_dir).reshape(n, -1)
        q = np.stack([codes & 0x0F, codes >> 4], -1).reshape(n, -1)[:, :k].astype(np.float32)
        scales = numpy_helper.to_array(inits[node.input[2]], onnx_dir).reshape(n, -1)
        if len(node.input) > 3:
            zp = numpy_helper.to_array(inits[node.input[3]], onnx_dir).reshape(n, -1)
            with_zero_points += 1
        else:
            zp = np.full_like(scales, 8.0)
        w = (q - np.repeat(zp, bs, 1)[:, :k]) * np.repeat(scales, bs, 1)[:, :k]
        prefix = node.input[1][: -len(".weight_Q4")]
        layer = prefix.split(".")[2] if prefix.startswith("model.layers.") else None
        if prefix.endswith("attn.qkv_proj"):
            parts = [rows_of(f"blk.{layer}.attn_q.weight", heads),
                     rows_of(f"blk.{layer}.attn_k.weight", kv_heads),
                     rows_of(f"blk.{layer}.attn_v.weight")]
        elif prefix.endswith("mlp.gate_up_proj"):
            parts = [rows_of(f"blk.{layer}.ffn_gate.weight"), rows_of(f"blk.{layer}.ffn_up.weight")]
        elif prefix == "lm_head":
            parts = [rows_of("output.weight" if "output.weight" in tensors else "token_embd.weight")]
        else:
            gguf_name = {"attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down"}
            parts = [rows_of(f"blk.{layer}.{gguf_name[prefix.split('.', 3)[3]]}.weight")]
        row = 0
        for want, four_bit in parts:
            got = w[row:row + want.shape[0]]
            row += want.shape[0]
            if four_bit:
                scale = float(np.abs(want).max()) or 1.0
                worst = max(worst, float(np.abs(got - want).max()) / scale)
                checked_rows += want.shape[0]
        assert row == n, f"{node.name}: {row} rows from GGUF for N={n}"
    print(json.dumps({"rows": checked_rows, "max_rel": worst,
                      "nodes_with_zero_points": with_zero_points}))


if __name__ == "__main__":
    main()
