"""Compare discretizations on fresh noise: distance of each student to the teacher."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ld3.data import EVAL_STREAM, noise_for_indices
from ld3.io import atomic_write_text
from ld3.runtime import baseline_times
from ld3.student import Rollout, SolverSpec
from models.base import Model
from samplers.discretizations import SKIP_TYPES
from samplers.solvers import steps_for_nfe

log = logging.getLogger("ld3")

DEFAULT_TEACHER = {"solver_name": "uni_pc", "steps": 20, "skip_type": "edm", "order": 3, "unipc_variant": "bh2"}


def teacher_config(data_dir: str | Path | None) -> dict:
    """The teacher's solver options, read from the data folder's gen_config.yml when present."""
    p = Path(data_dir) / "gen_config.yml" if data_dir else None
    if p is not None and p.is_file():
        g = yaml.safe_load(p.read_text()) or {}
        return {k: g.get(k, v) for k, v in DEFAULT_TEACHER.items()} | {"lower_order_final": g.get("lower_order_final", True)}
    return dict(DEFAULT_TEACHER, lower_order_final=True)


def sampling_seed(cfg: dict) -> int:
    """Seed of fresh noise (drawn from the evaluation stream, so never the teacher data's noise)."""
    s = cfg.get("sampling_seed")
    return int(s) if s is not None else int(cfg.get("seed", 0))


@torch.no_grad()
def images(model: Model, spec: SolverSpec, t: Tensor, tp: Tensor | None, z: Tensor, c: Any, uc: Any,
           batch: int, device: torch.device) -> Tensor:
    roll = Rollout(model, spec)
    out = []
    for i in range(0, z.shape[0], batch):
        sl = slice(i, i + batch)
        cc = None if c is None else c[sl]
        uu = None if uc is None else uc[sl]
        out.append(roll(z[sl].to(device), t.to(device), None if tp is None else tp.to(device), cc, uu)
                   .clamp(-1, 1).cpu())
    return torch.cat(out)


def baseline_names(cfg: dict, model: Model) -> list[str]:
    names = list(SKIP_TYPES)
    if model.schedule.name == "ve" and cfg["solver_name"] in ("ipndm", "dpm_solver++"):
        try:
            from samplers.gits import gits_sigmas

            gits_sigmas(cfg["solver_name"], int(cfg["steps"]), str(cfg.get("dataset", "cifar10")))
            names.append("gits")
        except (ImportError, ValueError):
            pass
    return names


def compare_with_baselines(cfg: dict, model: Model, device: torch.device, learned: dict[str, tuple[Tensor, Tensor]],
                           n: int, distance, out_dir: Path | None = None, batch: int = 100) -> dict[str, float]:
    """Mean distance to the teacher on ``n`` fresh noises for each learned and baseline discretization."""
    seed = sampling_seed(cfg)
    idx = list(range(n))
    z = noise_for_indices(seed, idx, model.latent_shape, EVAL_STREAM)
    c, uc = model.conditions(idx, seed, device)
    tcfg = teacher_config(cfg.get("data_dir"))
    tspec = SolverSpec.from_cfg({**cfg, **tcfg}, tcfg["solver_name"], tcfg.get("order"))
    tsteps = steps_for_nfe(tcfg["solver_name"], int(tcfg["steps"]))
    t_teacher = baseline_times({**cfg, **tcfg}, model, tcfg["skip_type"], tsteps, int(tcfg["steps"]))
    teacher = images(model, tspec, t_teacher, None, z, c, uc, batch, device)
    spec = SolverSpec.from_cfg(cfg)
    steps = steps_for_nfe(cfg["solver_name"], int(cfg["steps"]))
    rows: dict[str, float] = {}
    grids = {"teacher": teacher[:10]}
    for name, (t, tp) in learned.items():
        im = images(model, spec, t, tp, z, c, uc, batch, device)
        rows[name] = float(distance(im.to(device), teacher.to(device)).mean())
        grids[name] = im[:10]
    for name in baseline_names(cfg, model):
        t = baseline_times(cfg, model, name, steps, int(cfg["steps"]))
        im = images(model, spec, t, None, z, c, uc, batch, device)
        rows[name] = float(distance(im.to(device), teacher.to(device)).mean())
        grids[name] = im[:10]
    lines = [f"| discretization | {cfg['solver_name']} NFE {cfg['steps']}: distance to teacher ({n} fresh noises) |",
             "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in sorted(rows.items(), key=lambda kv: kv[1])]
    table = "\n".join(lines)
    print(table)
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "comparison.md", table + "\n")
        if cfg.get("visualize", True):
            from ld3.plots import image_grid

            image_grid(list(grids.values()), list(grids.keys()), Path(out_dir) / "samples_grid.png")
    return rows
