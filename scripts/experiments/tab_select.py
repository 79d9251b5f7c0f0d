"""Selection among robust.py runs by the plain L2 on the learning samples (README, "Quality at equal cost":
several scales, one kept). For each (model, cell): the fresh L2 of the default (huber2) and of the run with
the lowest learning L2 within each group of kinds, and the ratio to --paper_compat's median where known.

    .venv/bin/python scripts/experiments/tab_select.py out.jsonl "huber1;huber2;huber3" "huber1@S;huber2@S;huber3@S"
"""
import json, math, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
groups = [g.split(";") for g in sys.argv[2:]]
d = {(r["name"], r["cell"], r["kind"]): r for r in recs}
cells = list(dict.fromkeys((r["name"], r["cell"]) for r in recs))
print(f"{'':22s} {'huber2':>18s}" + "".join(f"{'select ' + str(i + 1):>26s}" for i in range(len(groups))))
worst = [0.0] * (len(groups) + 1)
for n, c in cells:
    base = d.get((n, c, "huber2"))
    row = f"{n[:6]:6s} {c:15s} "
    row += f"{base['fresh']:.3g} ({base['ratio']:.2f})".rjust(18) if base else "-".rjust(18)
    if base and not math.isnan(base["ratio"]):
        worst[0] = max(worst[0], base["ratio"])
    for i, g in enumerate(groups):
        runs = [d[(n, c, k)] for k in g if (n, c, k) in d]
        if not runs:
            row += "-".rjust(26); continue
        best = min(runs, key=lambda r: r["train"])
        row += f"{best['kind'][:9]} {best['fresh']:.3g} ({best['ratio']:.2f})".rjust(26)
        if not math.isnan(best["ratio"]):
            worst[i + 1] = max(worst[i + 1], best["ratio"])
    print(row)
print("worst ratio (cells with a paper median): " + ", ".join(f"{w:.3f}" for w in worst))
