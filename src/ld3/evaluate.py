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
from ld3.models.base import Model
from ld3.samplers.discretizations import SKIP_TYPES
from ld3.samplers.solvers import steps_for_nfe

log = logging.getLogger("ld3")


def _teacher_keys() -> tuple[str, ...]:
    """What names a teacher: solver, NFE, grid, order, every option a solver declares, arithmetic, flow shift."""
    from ld3.samplers.solvers import SOLVERS

    declared = dict.fromkeys(o.cfg_key for s in SOLVERS.values() for o in s.all_options)
    return ("solver_name", "steps", "skip_type", "order", *declared, "arithmetic", "flow_shift")


TEACHER_KEYS = _teacher_keys()
EXAMPLE_TEACHER = "solver_name=uni_pc,steps=20,skip_type=edm,order=3,unipc_variant=bh1"


def parse_teacher(spec: str) -> dict:
    out: dict[str, Any] = {}
    for part in str(spec).split(","):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        k = k.strip()
        if not sep or k not in TEACHER_KEYS:
            raise UserError(f"--teacher: cannot read {part.strip()!r}; give key=value pairs of {', '.join(TEACHER_KEYS)}, "
                            f"e.g. --teacher {EXAMPLE_TEACHER}")
        v = yaml.safe_load(v.strip())
        out[k] = v
    for k in ("solver_name", "steps", "skip_type"):
        if k not in out:
            raise UserError(f"--teacher needs {k}, e.g. --teacher {EXAMPLE_TEACHER}")
    return out


def teacher_config(cfg: dict) -> dict:
    """The teacher's solver options: the data folder's gen_config.yml, else ``--teacher``.

    The paper's gen_data.py writes no gen_config.yml: for its folders give ``--teacher`` (or measure
    against the folder's files, which needs no teacher run: sample.py --data_dir)."""
    data_dir = cfg.get("data_dir")
    p = Path(data_dir) / "gen_config.yml" if data_dir else None
    if p is not None and p.is_file():
        g = yaml.safe_load(p.read_text()) or {}
        out = {k: g[k] for k in TEACHER_KEYS if g.get(k) is not None}
        if cfg.get("teacher") and any(out.get(k) != v for k, v in parse_teacher(cfg["teacher"]).items()):
            log.warning("--teacher %s ignored: %s says the teacher was %s", cfg["teacher"], p,
                        ",".join(f"{k}={v}" for k, v in out.items()))
        return out
    if cfg.get("teacher"):
        return parse_teacher(cfg["teacher"])
    where = f"{data_dir} has no gen_config.yml (the paper's code writes none)" if data_dir else "no --data_dir given"
    raise UserError(f"cannot tell which teacher to run: {where}; give --teacher {EXAMPLE_TEACHER} (the teacher of "
                    "the paper's configs), or --data_dir of a folder gen_data.py wrote")


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


def images(model: Model, spec: SolverSpec, t: Tensor, tp: Tensor | None, z: Tensor, c: Any, uc: Any,
           batch: int, device: torch.device, desc: str | None = None) -> Tensor:
    """Decoded images (CPU) of the noises ``z``, ``batch`` at a time, as the solver returns them (not
    clamped: distances to the teacher are taken on these, as the paper's evaluator does; 8-bit metrics
    clamp); progress bar if ``desc``."""
    from ld3.sampling import chunked, sample_batches

    roll = Rollout(model, spec)
    grid = roll.grid(t.to(device), None if tp is None else tp.to(device), dtype=z.dtype)

    def draw(idx: list[int]):
        sl = slice(idx[0], idx[-1] + 1)
        return z[sl], None if c is None else c[sl], None if uc is None else uc[sl]

    out = [b.images.cpu() for b in sample_batches(roll, grid, chunked(range(z.shape[0]), batch), draw, device,
                                                  desc=desc, leave=False)]
    return torch.cat(out)


def teacher_times(cfg: dict, model: Model) -> tuple[SolverSpec, Tensor]:
    """The teacher's solver and discretization (``teacher_config``)."""
    tcfg = teacher_config(cfg)
    merged = {**cfg, **{k: None for k in TEACHER_KEYS if k not in ("solver_name", "steps", "skip_type", "arithmetic")},
              **tcfg}
    tspec = SolverSpec.from_cfg(merged, tcfg["solver_name"], tcfg.get("order"))
    tsteps = steps_for_nfe(tcfg["solver_name"], int(tcfg["steps"]))
    return tspec, baseline_times(merged, model, tcfg["skip_type"], tsteps, int(tcfg["steps"]))


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


def save_grid_png(path: Path, imgs: Tensor, ncol: int | None = None, title: str | None = None) -> None:
    """An image grid PNG of ``imgs`` (see :func:`grid_array`), with ``title`` lines in a white band above."""
    from PIL import Image, ImageDraw, ImageFont

    g = grid_array(imgs, ncol)
    im = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
    if title:
        font = ImageFont.load_default()
        lines = title.splitlines()
        line_h = 12
        width = max([im.width] + [int(ImageDraw.Draw(im).textlength(x, font=font)) + 8 for x in lines])
        band = Image.new(im.mode, (width, im.height + line_h * len(lines) + 6), 255)
        band.paste(im, (0, line_h * len(lines) + 6))
        draw = ImageDraw.Draw(band)
        for k, line in enumerate(lines):
            draw.text((4, 3 + k * line_h), line, fill=0, font=font)
        im = band
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    _atomic_write_bytes(Path(path), buf.getvalue())


def baseline_names(cfg: dict, model: Model) -> list[str]:
    """The paper's four grids, and those the model's schedule declares (GITS where its table exists for
    the solver and NFE)."""
    from ld3.runtime import gits_dataset
    from ld3.samplers.gits import GITS_SOLVERS, gits_sigmas

    names = list(SKIP_TYPES)
    for name in model.schedule.baselines:
        if name == "gits":
            try:
                if cfg["solver_name"] not in GITS_SOLVERS:
                    continue
                gits_sigmas(cfg["solver_name"], int(cfg["steps"]), gits_dataset(cfg))
            except (ValueError, UserError):
                continue
        names.append(name)
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
        rows[name] = float(distance(im.to(device).float(), teacher.to(device).float()).mean())
        grids[name] = im[:10]
    for name in baseline_names(cfg, model):
        t = baseline_times(cfg, model, name, steps, int(cfg["steps"]))
        im = images(model, spec, t, None, z, c, uc, batch, device)
        rows[name] = float(distance(im.to(device).float(), teacher.to(device).float()).mean())
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
