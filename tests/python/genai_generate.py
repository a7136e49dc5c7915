"""Greedy generation with onnxruntime-genai from an emitted directory.

  python genai_generate.py DIR N ID [ID ...]
Prints one JSON object: {"tokens": [the N generated ids], "text": decoded prompt round trip}.
"""
import json
import sys

import onnxruntime_genai as og

model_dir, n = sys.argv[1], int(sys.argv[2])
prompt = [int(x) for x in sys.argv[3:]]
model = og.Model(model_dir)
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=len(prompt) + n)
generator = og.Generator(model, params)
generator.append_tokens(prompt)
out = []
while not generator.is_done() and len(out) < n:
    generator.generate_next_token()
    out.append(int(generator.get_next_tokens()[0]))
tokenizer = og.Tokenizer(model)
print(json.dumps({"tokens": out, "decoded_prompt": tokenizer.decode(prompt)}))
