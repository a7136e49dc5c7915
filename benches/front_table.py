#!/usr/bin/env python3
"""The depth/quality front of `depthc search` reports, as one markdown table.

Given the report of a Layer Parallelism search and, optionally, that of the same
search with --drop-layers (both run with --task, --eval and --heal), prints per count k
(pairs, or layers dropped: the same depth): each plan's accuracy on every task (the
task's primary metric), the mean accuracy retained, perplexity on the first --eval text
as a multiple of the original's, and greedy tokens equal to the original's; the same for
each plan healed; and the original's row first.

    python3 benches/front_table.py LP_REPORT_DIR [DROP_REPORT_DIR]

Every number comes from the reports' search-report.json (schemas/search-report.schema.json).
"""

import json
import os
import sys


def load(d):
    with open(os.path.join(d, "search-report.json")) as f:
        return json.load(f)


def front(r):
    """k -> the best plan's entry (the first strategy's when several)."""
    out = {}
    for b in r["best_by_pairs"]:
        out.setdefault(b["pairs"], b)
    return out


def quality(q, tasks, ppl0):
    acc = {t["task"]: t["accuracy"] for t in q.get("tasks", [])}
    cells = [f"{primary(acc[t['name']], t):.2f}" if t["name"] in acc else "" for t in tasks]
    ret = q.get("accuracy_retained")
    cells.append(f"{ret:.1%}" if ret is not None else "")
    p = q.get("perplexity") or []
    cells.append(f"x{p[0] / ppl0:.3f}" if p else "")
    g = q.get("generation")
    cells.append(f"{g['equal_fraction']:.1%}" if g else "")
    return cells


def primary(acc, task):
    return acc[task["primary_metric"]]


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    lp = load(sys.argv[1])
    drop = load(sys.argv[2]) if len(sys.argv) == 3 else None
    tasks = lp.get("tasks", [])
    ppl0 = lp["eval"][0]["perplexity_before"]
    names = [f"{t['name']} ({t['docs']} docs)" for t in tasks]
    head = ["k", "depth", "plan"] + names + ["retained", "perplexity", "greedy equal"]
    head += ["healed: " + h for h in ["retained", "perplexity", "greedy equal"]]
    if drop:
        head += ["dropped: plan", "retained", "perplexity", "greedy equal",
                 "healed: retained", "healed: perplexity"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    layers = lp["model"]["layers"]
    orig = [f"{primary(t['original'], t):.2f}" for t in tasks]
    row = ["0", str(layers), "original"] + orig + ["100%", "x1.000", "100%"] + [""] * 3
    if drop:
        row += [""] * 6
    print("| " + " | ".join(row) + " |")
    fl, fd = front(lp), front(drop) if drop else {}
    for k in sorted(fl):
        b = fl[k]
        q = quality(b, tasks, ppl0)
        row = [str(k), str(layers - k), f"`{b['plan']}`"] + q
        h = b.get("healed")
        row += quality(h, tasks, ppl0)[-3:] if h else [""] * 3
        if drop:
            d = fd.get(k)
            if d:
                dq = quality(d, tasks, ppl0)[-3:]
                dh = quality(d["healed"], tasks, ppl0)[-3:-1] if d.get("healed") else ["", ""]
                row += [f"`{d['plan']}`"] + dq + dh
            else:
                row += [""] * 6
        print("| " + " | ".join(row) + " |")
    t = lp["timings"]
    print(f"\n{'LP search' if drop else 'search'}: {t['total_s'] / 60:.0f} min in all (search {t['search_s']:.0f} s, "
          f"tasks {t['tasks_s']:.0f} s, healing and the healed front {t['heal_s']:.0f} s)")
    if drop:
        t = drop["timings"]
        print(f"drop search: {t['total_s'] / 60:.0f} min in all (search {t['search_s']:.0f} s, "
              f"tasks {t['tasks_s']:.0f} s, healing and the healed front {t['heal_s']:.0f} s)")


if __name__ == "__main__":
    main()
