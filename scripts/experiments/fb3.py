"""full batch Adam + cosine, optional latent relaxation (projected gradient step on z' each iteration)."""
import math

import torch

from ld3.trainer import project

AGG = {"mean": lambda l: l.mean(), "trim5": lambda l: l.sort().values[:-5].mean(), "sqrt": lambda l: l.clamp_min(1e-12).sqrt().mean()}
def run(E, d, sset, phases, agg="mean", relax=0.0, shift_lr=None, bound=None):
    best = [math.inf, None]
    z = sset.latent.clone(); zp = z.clone()
    bound = E.bound * relax if bound is None else bound
    slr = E.shift_lr if shift_lr is None else shift_lr
    for iters, lr, learn2 in phases:
        ps = [d.params1] + ([d.params2] if learn2 else [])
        opt = torch.optim.Adam(ps, lr=lr)
        sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
        for it in range(iters):
            t, tp = d()
            zz = zp.clone().requires_grad_(relax > 0)
            per = E.distance(E.rollout(zz, E.rollout.grid(t, tp)).float(), sset.img.float())
            loss = AGG[agg](per)
            v = float(loss.detach())
            if v < best[0]: best[0], best[1] = v, (d.params1.detach().clone(), d.params2.detach().clone())
            opt.zero_grad(); loss.backward(); opt.step(); sch.step()
            if relax > 0:
                g = zz.grad * len(per)  # each sample's own loss gradient
                zp = project(zz.detach() - slr * g, z, bound)
    with torch.no_grad():
        d.params1.copy_(best[1][0]); d.params2.copy_(best[1][1])
        return d()
