"""The full-batch trainer (ld3.full_batch, with fb_robust 0: the plain mean) on per-sample transforms of the
L2 distance, as README's "Quality at equal cost" measured them: L2 (the plain mean), powN (the mean of d^N),
huberQ (2c(sqrt(1 + d/c) - 1) with c = Q x the median starting distance: what --fb_robust Q became).
Prints, and appends to OUT, the L2 to the 100 learning samples and to the 1000 fresh ones of
scripts/quality_seeds.sh, and the ratio to --paper_compat's median there (samples/quality_seeds/<name>.txt
of a run made before this one). Run from the repository root, e.g.

    .venv/bin/python scripts/experiments/robust.py digits_gmm "L2;pow0.5;huber1;huber2" uni_pc10,ipndm4 out.jsonl '{"chunk":50}'
    .venv/bin/python scripts/experiments/tab_robust.py out.jsonl
"""
import sys, json, time, statistics as st
sys.path.insert(0, "scripts/experiments")
from pathlib import Path
import torch
from harness import Env, load_samples
from ld3.full_batch import FullBatchConfig, FullBatchTrainer
from ld3.cli.main import learning_sets

def paper_median(name, solver, nfe):
    v = [float(l.split()[4]) for l in open(f"samples/quality_seeds/{name}.txt")
         if l.split()[:3] == [solver, str(nfe), "paper"]]
    return st.median(v) if v else float("nan")

def make(E, kind, base):
    if kind == "L2": return base
    if kind.startswith("pow"):
        p = float(kind[3:]); return lambda a, b: base(a, b).clamp_min(1e-12) ** p
    if kind.startswith("huber"):  # pseudo-Huber of the per-sample L2, scale = q * median initial loss
        q = float(kind[5:] or 1)
        with torch.no_grad():
            t, tp = E.disc()()
            g = E.rollout.grid(t, tp, dtype=E.data.latent.dtype)
            d0 = base(E.rollout(E.data.latent, g).float(), E.data.img.float())
        c = q * float(d0.median())
        return lambda a, b: 2 * c * ((1 + base(a, b) / c).sqrt() - 1)
    raise ValueError(kind)

name, kinds, cells, out = sys.argv[1], sys.argv[2].split(";"), sys.argv[3].split(","), sys.argv[4]
extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
for cell in cells:
    solver, nfe = cell.rstrip("0123456789"), int(cell[len(cell.rstrip("0123456789")):])
    E = Env(name, solver, nfe)
    shp = E.model.latent_shape
    F = load_samples(Path(E.fresh_dir), 1000, shp, shp)
    pm = paper_median(name, solver, nfe)
    for kind in kinds:
        k, _, opts = kind.partition("@")
        fbo = {"chunk": 100, "robust": 0.0, **extra, **(json.loads(opts) if opts else {})}
        d = E.disc()
        tr_set, va_set = learning_sets(E.data, 50, 50, "train")
        T = FullBatchTrainer(d, E.rollout, make(E, k, E.distance), tr_set, va_set, FullBatchConfig(**fbo), E.device)
        t0 = time.perf_counter(); T.run(); el = time.perf_counter() - t0
        with torch.no_grad(): t, tp = d()
        tr, fr = E.loss_on(E.data, t, tp), E.loss_on(F, t, tp)
        rec = dict(name=name, cell=cell, kind=kind, train=tr, fresh=fr, ratio=fr / pm, secs=el, t=t.tolist(), tp=tp.tolist())
        with open(out, "a") as f: f.write(json.dumps(rec) + "\n")
        print(f"{name[:6]} {cell:15s} {kind:28s} train {tr:.4g} fresh {fr:.4g} ratio {fr/pm:.2f} {el:.1f}s", flush=True)
