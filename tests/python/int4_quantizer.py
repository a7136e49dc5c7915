#!/usr/bin/env python3
"""Check depthc's int4 weights against ONNX Runtime's own blockwise quantiser.

    int4_quantizer.py ONNX_DIR HF_DIR

ONNX_DIR: `depthc emit --dtype int4` of the unmodified model (no plan).
HF_DIR:   `depthc convert --dtype f32` of the same checkpoint (the float weights).

For every MatMulNBits node, its codes and scales must equal, byte for byte,
what onnxruntime's `quantize_matmul_4bits` (the function the onnxruntime-genai
builder's int4 export calls, symmetric) makes of the float weights it stands for:
q|k|v side by side for `qkv_proj`, gate|up for `gate_up_proj`, the embedding for a
tied `lm_head`. Prints one JSON object: nodes checked, the first mismatch if any,
and the embedding's op and inputs (a tied embedding reads the LM head's codes).
"""

import json
import os
import struct
import sys

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits


def safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", f"{name}: convert with --dtype f32"
        b, e = t["data_offsets"]
        out[name] = np.frombuffer(data[b:e], np.float32).reshape(t["shape"])
    return out


def main():
    onnx_dir, hf_dir = sys.argv[1], sys.argv[2]
    w = safetensors(os.path.join(hf_dir, "model.safetensors"))
    model = onnx.load(os.path.join(onnx_dir, "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    checked, mismatch = 0, None
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n, bs = attrs["K"], attrs["N"], attrs["block_size"]
        prefix = node.input[1][: -len(".weight_Q4")]  # model.layers.3.attn.qkv_proj
        if prefix == "lm_head":
            rows = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        elif prefix.endswith("attn.qkv_proj"):
            layer = prefix[: -len(".attn.qkv_proj")]
            rows = np.concatenate(
                [w[f"{layer}.self_attn.{p}_proj.weight"] for p in "qkv"], axis=0)
        elif prefix.endswith("mlp.gate_up_proj"):
            layer = prefix[: -len(".mlp.gate_up_proj")]
            rows = np.concatenate(
                [w[f"{layer}.mlp.{p}_proj.weight"] for p in ["gate", "up"]], axis=0)
        elif prefix.endswith("attn.o_proj"):
            rows = w[prefix.replace(".attn.", ".self_attn.") + ".weight"]
        else:
            rows = w[prefix + ".weight"]
        assert rows.shape == (n, k), f"{prefix}: {rows.shape} vs N={n} K={k}"
        blocks = (k + bs - 1) // bs
        codes = np.zeros((n, blocks, bs // 2), np.uint8)
        scales = np.zeros(n * blocks, np.float32)
        zero_points = np.zeros(n * ((blocks + 1) // 2), np.uint8)
        quantize_matmul_4bits(codes, np.ascontiguousarray(rows.T), scales, zero_points, bs, n, k, True)
        got_codes = numpy_helper.to_array(inits[node.input[1]], onnx_dir)
        got_scales = numpy_helper.to_array(inits[node.input[2]], onnx_dir).reshape(-1)
        checked += 1
        if not np.array_equal(got_scales, scales):
            i = int(np.flatnonzero(got_scales != scales)[0])
            mismatch = f"{node.name}: scale {i} is {got_scales[i]!r}, onnxruntime {scales[i]!r}"
            break
        if not np.array_equal(got_codes, codes):
            i = np.argwhere(got_codes != codes)[0].tolist()
            mismatch = f"{node.name}: code byte {i} differs"
            break
    embedding = [n for n in model.graph.node if n.name.startswith("/model/embed_tokens/")
                 and n.op_type in ("Gather", "GatherBlockQuantized")]
    print(json.dumps({"checked": checked, "mismatch": mismatch,
                      "embedding": [embedding[0].op_type, list(embedding[0].input)]}))


if __name__ == "__main__":
    main()
