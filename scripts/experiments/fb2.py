import math
import sys
import time

import torch

from harness import Env

AGG = {"mean": lambda l: l.mean(), "sqrt": lambda l: l.clamp_min(1e-12).sqrt().mean(), "log": lambda l: l.clamp_min(1e-12).log().mean(),
       "trim5": lambda l: l.sort().values[:-5].mean(), "trim10": lambda l: l.sort().values[:-10].mean()}
def run(E, d, sset, phases, method="adam", agg="mean"):
    """phases: list of (iters, lr, learn2). Full batch; keeps the best (free: the loss of the params before each step)."""
    best = [math.inf, None]
    evals = 0
    def closure_factory(opt):
        def closure():
            nonlocal evals
            t, tp = d()
            gr = E.rollout.grid(t, tp, dtype=sset.latent.dtype)
            loss = AGG[agg](E.distance(E.rollout(sset.latent, gr).float(), sset.img.float()))
            v = float(loss.detach())
            if v < best[0]: best[0], best[1] = v, (d.params1.detach().clone(), d.params2.detach().clone())
            opt.zero_grad(); loss.backward(); evals += 1
            return loss
        return closure
    for iters, lr, learn2 in phases:
        ps = [d.params1] + ([d.params2] if learn2 else [])
        if method == "lbfgs":
            opt = torch.optim.LBFGS(ps, lr=1, max_iter=iters, history_size=10, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-12, tolerance_change=1e-12)
            opt.step(closure_factory(opt))
        else:
            opt = torch.optim.Adam(ps, lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters) if method == "adamcos" else None
            c = closure_factory(opt)
            for it in range(iters):
                c(); opt.step()
                if sched: sched.step()
    with torch.no_grad():
        d.params1.copy_(best[1][0]); d.params2.copy_(best[1][1])
        t, tp = d()
    return t, tp, evals, best[0]
if __name__ == "__main__":
    name, method = sys.argv[1], sys.argv[2]
    spec = eval(sys.argv[3])
    cells = [(s, n) for s in ("uni_pc", "dpm_solver++", "ipndm") for n in (4, 6, 10)]
    if len(sys.argv) > 4: cells = [c for c in cells if f"{c[0]}{c[1]}" in sys.argv[4].split(",")]
    for solver, nfe in cells:
        E = Env(name, solver, nfe)
        d = E.disc(); t0 = time.perf_counter()
        t, tp, ev, bl = run(E, d, E.data, spec, method)
        el = time.perf_counter() - t0
        print(solver, nfe, "fresh", f"{E.fresh_l2(t, tp):.5g}", "train", f"{bl:.5g}", "evals", ev, f"{el:.1f}s", flush=True)
