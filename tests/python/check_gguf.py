"""Read a GGUF depthc wrote with the `gguf` package (gguf-py, llama.cpp's own
Python reader), independently of depthc's reader, and print what it holds:

    python check_gguf.py MODEL.gguf

One JSON object: the architecture, the per-layer arrays, the scalar hparams,
each tensor's name, ggml type and shape (gguf-py's order: fastest first), and
whether every tensor's data lies inside the file at an aligned offset.
"""
import json
import sys

from gguf import GGUFReader

r = GGUFReader(sys.argv[1])


def value(field):
    if len(field.types) > 1:  # an array
        return [field.parts[i].tolist()[0] if field.parts[i].size == 1 else bytes(field.parts[i]).decode()
                for i in field.data]
    part = field.parts[field.data[0]]
    if field.types[0].name == "STRING":
        return bytes(part).decode()
    return part.tolist()[0]


keep = lambda k: k.startswith("deci.") or k in ("general.architecture", "tokenizer.ggml.model") or k.startswith("depthc.")
meta = {k: value(f) for k, f in r.fields.items() if keep(k)}
tensors = [
    {"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in t.shape], "offset": int(t.data_offset)}
    for t in r.tensors
]
print(json.dumps({
    "meta": meta,
    "tokens": len(r.fields["tokenizer.ggml.tokens"].data),
    "tensors": tensors,
    "aligned": all(t["offset"] % 32 == 0 for t in tensors),
}))
