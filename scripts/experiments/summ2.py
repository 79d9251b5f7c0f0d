import json, sys, statistics as st
recs = [json.loads(l) for f in sys.argv[1:] for l in open(f)]
d = {}
for r in recs: d.setdefault((r["name"], r["cell"]), {}).setdefault(r["mode"], []).append(r)
modes = []
for r in recs:
    if r["mode"] != "paper" and r["mode"] not in modes: modes.append(r["mode"])
print(f"{'':26s}" + "".join(f"{m:>16s}" for m in modes))
for (n, c), m in d.items():
    if "paper" not in m: continue
    pf, pb = st.median(r["fresh"] for r in m["paper"]), st.median(r["big"] for r in m["paper"])
    pt = st.median(r["secs"] for r in m["paper"])
    line = f"{n[:6]:6s} {c:15s} {pt:4.1f}s"
    for mode in modes:
        rs = m.get(mode)
        if not rs: line += f"{'-':>16s}"; continue
        f, b, s = st.median(r["fresh"] for r in rs), st.median(r["big"] for r in rs), st.median(r["secs"] for r in rs)
        line += f"  {f/pf:.2f}/{b/pb:.2f} {s:4.1f}"
    print(line)
