import json
import sys
import time
from pathlib import Path


import fb3
from harness import ROOT, Env, load_samples

name, modes, cells, out = sys.argv[1], sys.argv[2].split(";"), sys.argv[3].split(","), sys.argv[4]
R = {
  "A40": dict(phases=[(40,0.05,False),(40,0.03,True)]),
  "B25": dict(phases=[(25,0.05,False),(25,0.03,True)]),
  "C40relax": dict(phases=[(40,0.05,False),(40,0.03,True)], relax=1.0),
  "D40hi": dict(phases=[(40,0.1,False),(40,0.05,True)]),
  "E25relax10": dict(phases=[(25,0.05,False),(25,0.03,True)], relax=10.0),
  "F60joint": dict(phases=[(60,0.05,True)]),
  "G60hi": dict(phases=[(60,0.1,False),(40,0.05,True)]),
  "H40vhi": dict(phases=[(40,0.2,False),(40,0.1,True)]),
}
for c in cells:
    solver, nfe = c.rstrip("0123456789"), int(c[len(c.rstrip("0123456789")):])
    E = Env(name, solver, nfe)
    shp = E.model.latent_shape
    E.big = load_samples(Path(ROOT[name] + "/big/uni_pc_NFE20_edm_seed2"), 1000, shp, shp)
    for mode in modes:
        t0 = time.perf_counter()
        d = E.disc(); t, tp = fb3.run(E, d, E.data, **R[mode])
        el = time.perf_counter() - t0
        rec = dict(name=name, cell=c, mode=mode, seed=0, t=t.tolist(), tp=tp.tolist(), secs=el,
                   fresh=E.fresh_l2(t, tp), big=E.loss_on(E.big, t, tp), train=E.loss_on(E.data, t, tp))
        with open(out, "a") as f: f.write(json.dumps(rec) + "\n")
        print(c, mode, f"{rec['fresh']:.4g} {rec['big']:.4g} {el:.1f}s", flush=True)
