"""Dequantise GGUF tensors with the `gguf` package (llama.cpp's Python reader, an
implementation independent of depthc's) and print, per tensor, its ggml type, a strided
sample of 512 values and the sum of all values (float64), as one JSON object.

  python gguf_dequant.py FILE TENSOR [TENSOR ...]
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

reader = GGUFReader(sys.argv[1])
tensors = {t.name: t for t in reader.tensors}
out = {}
for name in sys.argv[2:]:
    t = tensors[name]
    values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
    step = max(1, values.size // 512)
    out[name] = {
        "type": t.tensor_type.name,
        "numel": int(values.size),
        "step": step,
        "sample": values[::step][:512].tolist(),
        "sum": float(values.astype(np.float64).sum()),
    }
print(json.dumps(out))
