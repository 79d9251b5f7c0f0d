"""Ratios of robust.py's records: one row per (model, cell), one column per objective; the worst last."""
import json, sys
recs = [json.loads(l) for f in sys.argv[1:] for l in open(f)]
kinds = []; cells = []
for r in recs:
    if r["kind"] not in kinds: kinds.append(r["kind"])
    if (r["name"], r["cell"]) not in cells: cells.append((r["name"], r["cell"]))
d = {(r["name"], r["cell"], r["kind"]): r for r in recs}
print(f"{'':22s}" + "".join(f"{k:>10s}" for k in kinds))
for n, c in cells:
    print(f"{n[:6]:6s} {c:15s}" + "".join(f"{d[(n,c,k)]['ratio']:10.2f}" if (n,c,k) in d else f"{'-':>10s}" for k in kinds))
print("max   " + " " * 16 + "".join(f"{max(r['ratio'] for r in recs if r['kind']==k):10.2f}" for k in kinds))
