import json
import sys
import time
from pathlib import Path

import torch

import fb2
from harness import ROOT, Env, load_samples

name, modes, cells, out = sys.argv[1], sys.argv[2].split(";"), sys.argv[3].split(","), sys.argv[4]
RECIPES = {
  "fb_mean": ("adamcos", [(40,0.05,False),(40,0.03,True)], "mean"),
  "fb_trim5": ("adamcos", [(40,0.05,False),(40,0.03,True)], "trim5"),
  "fb_sqrt": ("adamcos", [(40,0.05,False),(40,0.03,True)], "sqrt"),
}
for c in cells:
    solver, nfe = c.rstrip("0123456789"), int(c[len(c.rstrip("0123456789")):])
    Es = {}
    for mode in modes:
        paper = mode == "paper"
        if paper not in Es: Es[paper] = Env(name, solver, nfe, ["--paper_compat"] if paper else [])
        E = Es[paper]
        if not hasattr(E, "big"):
            shp = E.model.latent_shape
            E.big = load_samples(Path(ROOT[name] + "/big/uni_pc_NFE20_edm_seed2"), 1000, shp, shp)
        seeds = (0, 1, 2) if mode in ("paper", "default") else (0,)
        for seed in seeds:
            t0 = time.perf_counter()
            if mode in ("paper", "default"):
                if paper: torch.manual_seed(seed)
                t, tp, el, res, _ = E.train(seed)
            else:
                method, spec, agg = RECIPES[mode]
                d = E.disc(); t, tp, ev, bl = fb2.run(E, d, E.data, spec, method, agg)
            el = time.perf_counter() - t0
            rec = dict(name=name, cell=c, mode=mode, seed=seed, t=t.tolist(), tp=tp.tolist(), secs=el,
                       fresh=E.fresh_l2(t, tp), big=E.loss_on(E.big, t, tp), train=E.loss_on(E.data, t, tp))
            with open(out, "a") as f: f.write(json.dumps(rec) + "\n")
            print(c, mode, seed, f"{rec['fresh']:.4g} {rec['big']:.4g} {el:.1f}s", flush=True)
