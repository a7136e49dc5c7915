"""ONNX's own checker on an emitted model, with shape inference (full_check).

  python check_onnx.py DIR/model.onnx
Prints one JSON object: opset, IR version, node and initializer counts.
"""
import json
import sys

import onnx

path = sys.argv[1]
onnx.checker.check_model(path, full_check=True)
m = onnx.load(path, load_external_data=False)
print(json.dumps({
    "ir_version": m.ir_version,
    "opset": {o.domain: o.version for o in m.opset_import},
    "nodes": len(m.graph.node),
    "initializers": len(m.graph.initializer),
    "inputs": [i.name for i in m.graph.input],
    "outputs": [o.name for o in m.graph.output],
}))
