"""Check a `depthc search` report folder: search-report.json against its JSON Schema
(draft 2020-12), and its SVGs (accuracy.svg too with --task) as well-formed SVG documents
with drawn content.

  python check_report.py REPORT_DIR SCHEMA
Prints one JSON object: chosen plan and the number of rectangles/paths per SVG.
"""
import json
import os
import sys
import xml.etree.ElementTree as ET

import jsonschema

report_dir, schema_path = sys.argv[1], sys.argv[2]
with open(schema_path) as f:
    schema = json.load(f)
with open(os.path.join(report_dir, "search-report.json")) as f:
    report = json.load(f)
jsonschema.Draft202012Validator.check_schema(schema)
jsonschema.Draft202012Validator(schema).validate(report)

svgs = {}
names = ["heatmap.svg", "pairs.svg"]
if "accuracy_retained" in report:
    names.append("accuracy.svg")
for name in names:
    root = ET.parse(os.path.join(report_dir, name)).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg", root.tag
    assert float(root.get("width")) > 0 and float(root.get("height")) > 0
    tags = [el.tag.split("}")[1] for el in root.iter()]
    svgs[name] = {t: tags.count(t) for t in ("rect", "polyline", "path", "circle", "text")}
print(json.dumps({"chosen_plan": report["chosen_plan"], "svg": svgs}))
