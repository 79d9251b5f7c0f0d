"""Fresh-noise evaluation: sampling N images with any discretization, the teacher's images for the
same noises, the files sample.py writes (``.npz``, grid PNG), and the quick comparison main.py runs.

Fresh noise comes from ``EVAL_STREAM`` with ``--sampling_seed`` (default ``--seed``), so it never
coincides with the teacher data's noise (``TRAIN_STREAM``) even when the seeds are equal.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from ld3.config import UserError
from ld3.data import EVAL_STREAM, noise_for_indices, to_uint8
from ld3.io import _atomic_write_bytes, atomic_write_text
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


def fresh_noise(cfg: dict, model: Model, n: int, device: torch.device,
                start: int = 0) -> tuple[Tensor, Any, Any]:
    """Unit noise (CPU) and conditions of evaluation samples ``start .. start + n - 1``."""
    seed = sampling_seed(cfg)
    idx = list(range(start, start + n))
    z = noise_for_indices(seed, idx, model.latent_shape, EVAL_STREAM)
    c, uc = model.conditions(idx, seed, device, balanced=True)  # class labels uniform over classes
    return z, c, uc


@torch.no_grad()
def images(model: Model, spec: SolverSpec, t: Tensor, tp: Tensor | None, z: Tensor, c: Any, uc: Any,
           batch: int, device: torch.device, desc: str | None = None) -> Tensor:
    """Decoded images in [-1, 1] (CPU) of the noises ``z``, ``batch`` at a time; progress bar if ``desc``."""
    from tqdm import tqdm

    roll = Rollout(model, spec)
    out = []
    with tqdm(total=z.shape[0], desc=desc, unit="img", disable=None if desc else True, leave=False) as bar:
        for i in range(0, z.shape[0], batch):
            sl = slice(i, i + batch)
            cc = None if c is None else c[sl]
            uu = None if uc is None else uc[sl]
            out.append(roll(z[sl].to(device), t.to(device), None if tp is None else tp.to(device), cc, uu)
                       .clamp(-1, 1).cpu())
            bar.update(out[-1].shape[0])
    return torch.cat(out)


def teacher_times(cfg: dict, model: Model) -> tuple[SolverSpec, Tensor]:
    """The teacher's solver and discretization (``teacher_config`` of ``cfg['data_dir']``)."""
    tcfg = teacher_config(cfg.get("data_dir"))
    tspec = SolverSpec.from_cfg({**cfg, **tcfg}, tcfg["solver_name"], tcfg.get("order"))
    tsteps = steps_for_nfe(tcfg["solver_name"], int(tcfg["steps"]))
    return tspec, baseline_times({**cfg, **tcfg}, model, tcfg["skip_type"], tsteps, int(tcfg["steps"]))


def teacher_images(cfg: dict, model: Model, z: Tensor, c: Any, uc: Any, batch: int, device: torch.device,
                   desc: str | None = None) -> Tensor:
    """The teacher's images of the noises ``z`` (solver options as in :func:`teacher_config`)."""
    tspec, t = teacher_times(cfg, model)
    return images(model, tspec, t, None, z, c, uc, batch, device, desc)


def save_npz(path: Path, imgs: Tensor | np.ndarray) -> np.ndarray:
    """Write images as ``arr_0``: N x H x W x C uint8, the layout EDM's fid.py and ADM's evaluator read.

    ``imgs`` is N x C x H x W in [-1, 1] (a tensor) or already an N x H x W x C uint8 array.
    """
    arr = to_uint8(imgs) if isinstance(imgs, Tensor) else np.asarray(imgs)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"expected N x H x W x C uint8 images, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    np.savez(buf, arr_0=arr)
    _atomic_write_bytes(Path(path), buf.getvalue())
    return arr


def grid_array(imgs: Tensor, ncol: int | None = None, pad: int = 1, min_tile: int = 32) -> np.ndarray:
    """Tile N x C x H x W images in [-1, 1] into one H' x W' x C uint8 array (pixel-exact, white gaps).

    ``ncol`` defaults to ceil(sqrt(N)); tiles smaller than ``min_tile`` pixels are enlarged by an
    integer factor (nearest neighbour) so that 8 x 8 digits stay visible.
    """
    arr = to_uint8(imgs)
    n, h, w, c = arr.shape
    k = max(1, math.ceil(min_tile / max(h, w)))
    if k > 1:
        arr = arr.repeat(k, axis=1).repeat(k, axis=2)
        h, w = h * k, w * k
    ncol = ncol or max(1, math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = arr[i]
    return out


def save_grid_png(path: Path, imgs: Tensor, ncol: int | None = None) -> None:
    """An image grid PNG of ``imgs`` (see :func:`grid_array`)."""
    from PIL import Image

    g = grid_array(imgs, ncol)
    buf = io.BytesIO()
    Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).save(buf, format="PNG")
    _atomic_write_bytes(Path(path), buf.getvalue())


def baseline_names(cfg: dict, model: Model) -> list[str]:
    names = list(SKIP_TYPES)
    if model.schedule.name == "ve" and cfg["solver_name"] in ("ipndm", "dpm_solver++"):
        try:
            from samplers.gits import gits_sigmas

            from ld3.runtime import gits_dataset

            gits_sigmas(cfg["solver_name"], int(cfg["steps"]), gits_dataset(cfg))
            names.append("gits")
        except (ImportError, ValueError, UserError):
            pass
    return names


def compare_with_baselines(cfg: dict, model: Model, device: torch.device, learned: dict[str, tuple[Tensor, Tensor]],
                           n: int, distance, out_dir: Path | None = None, batch: int = 100) -> dict[str, float]:
    """Mean distance to the teacher on ``n`` fresh noises for each learned and baseline discretization."""
    z, c, uc = fresh_noise(cfg, model, n, device)
    teacher = teacher_images(cfg, model, z, c, uc, batch, device)
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
