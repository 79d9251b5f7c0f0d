"""Comparison tables: every baseline discretization and each learned run, over a list of NFEs.

For one model and solver, all cells use the same fresh noises (evaluation stream, ``--sampling_seed``).
Rows are discretizations, columns NFEs, cells one metric (lower is better):

- ``teacher``: mean distance (``--loss_type``: L2, L1 or LPIPS) to the teacher's images of the same noises
  (teacher solver from the data folder's ``gen_config.yml``, else UniPC 20 NFE, order 3, edm);
- ``fid``: FID against ``--ref_path`` (Inception pool features, ``ld3.fid``);
- ``digit_fd``: Frechet distance in the digit classifier's feature space (8x8 digits models).

A learned run fills the cell of the NFE it was trained for (from the number of its times and its
solver); baselines fill every column. Writes ``comparison.csv``, ``comparison.md`` (a Markdown table
made to be pasted into the README) and ``comparison.png`` (metric against NFE).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ld3.config import UserError
from ld3.evaluate import baseline_names, fresh_noise, images, sampling_seed, teacher_config, teacher_images
from ld3.export import LearnedRun
from ld3.io import atomic_write_text
from ld3.runtime import baseline_times, check_solver_options
from ld3.student import SolverSpec
from ld3.models.base import Model
from ld3.samplers.solvers import nfe_of, steps_for_nfe

log = logging.getLogger("ld3")

METRICS = ("teacher", "fid", "digit_fd")
BASELINE_ORDER = ("time_uniform", "time_quadratic", "logSNR", "edm", "gits")


@dataclass
class Table:
    """cells[row][nfe] = metric value; rows in display order."""

    metric: str
    metric_label: str
    nfes: list[int]
    cells: dict[str, dict[int, float]] = field(default_factory=dict)
    caption: str = ""
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[str]:
        return list(self.cells)

    def best(self, nfe: int) -> str | None:
        col = {r: v[nfe] for r, v in self.cells.items() if nfe in v and math.isfinite(v[nfe])}
        return min(col, key=col.get) if col else None


def parse_nfes(text: str | None) -> list[int]:
    if text is None or str(text).strip() == "":
        return []
    try:
        out = [int(s) for s in str(text).replace("[", "").replace("]", "").split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--nfes must be comma-separated integers, e.g. 4,6,8,10; got {text!r}") from None
    if any(n < 1 for n in out):
        raise UserError(f"--nfes must be positive, got {text!r}")
    return out


def make_scorer(metric: str, cfg: dict, model: Model, device: torch.device, z: Tensor, c, uc,
                batch: int) -> tuple[Callable[[Tensor], float], str, list[str]]:
    """``(score(images) -> float, label, notes)``; loads what the metric needs (teacher images, networks)."""
    if metric == "teacher":
        from ld3.losses import make_distance

        dist = make_distance(cfg["loss_type"], device, int(cfg.get("lpips_size") or 224))
        tcfg = teacher_config(cfg)
        teacher = teacher_images(cfg, model, z, c, uc, batch, device, desc="teacher")

        def score(im: Tensor) -> float:
            vals = [dist(im[i:i + batch].to(device).float(), teacher[i:i + batch].to(device).float()).detach().cpu()
                    for i in range(0, len(im), batch)]
            return float(torch.cat(vals).mean())

        label = (f"{cfg['loss_type']} distance to the teacher ({tcfg['solver_name']}, {tcfg['steps']} NFE, "
                 f"{tcfg['skip_type']})")
        return score, label, []
    if metric == "fid":
        from ld3.fid import FID

        fid = FID(cfg.get("ref_path"), device, cfg.get("inception_weights"))
        notes = []
        if z.shape[0] < 50000:
            notes.append(f"FID from {z.shape[0]} samples (biased upwards; papers use 50000).")
        return (lambda im: fid(im)), f"FID against {Path(str(cfg['ref_path'])).name}", notes
    if metric == "digit_fd":
        from ld3.fid import DigitsJudge, is_digits

        if not is_digits(model):
            raise UserError(f"--metric digit_fd needs an 8x8 digits model (digits_gmm, digits_unet), "
                            f"not {model.name}")
        judge = DigitsJudge(seed=sampling_seed(cfg))
        ref = judge(_quantize(teacher_images(cfg, model, z, c, uc, batch, device, desc="teacher")))
        notes = [f"Floor (held-out real digits vs training digits, {ref['n_floor']} each): "
                 f"{ref['frechet_floor']:.4g}; the teacher's samples score {ref['frechet']:.4g}."]

        def score_fd(im: Tensor) -> float:
            return float(judge(_quantize(im))["frechet"])

        label = "Frechet distance in the digit classifier's features (samples vs training digits)"
        return score_fd, label, notes
    raise UserError(f"unknown --metric {metric!r}; choose from {', '.join(METRICS)}")


def _quantize(im: Tensor) -> Tensor:
    """What the saved uint8 files hold, back in [-1, 1]: metrics of samples are computed on it."""
    return ((im.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def resolve_nfe(solver: str, nfe: int) -> int:
    """The NFE the solver really makes for a budget (heun: odd numbers only)."""
    real = nfe_of(solver, steps_for_nfe(solver, nfe))
    if real != nfe:
        log.warning("%s makes %d network evaluations for a budget of %d: the column is NFE %d",
                    solver, real, nfe, real)
    return real


def compare(cfg: dict, model: Model, device: torch.device, runs: list[LearnedRun], nfes: list[int],
            metric: str = "teacher", n: int = 100, batch: int = 100) -> Table:
    """Fill the table: every baseline at every NFE, each learned run at its own NFE."""
    solver = cfg["solver_name"]
    keep: list[LearnedRun] = []
    for r in runs:
        if r.solver != solver:
            log.warning("skipping %s: learned for %s, this table is for %s", r.path, r.solver, solver)
            continue
        if r.order is not None and cfg.get("order") is not None and int(r.order) != int(cfg["order"]):
            log.warning("%s was learned with order %s; the table uses order %s",
                        r.path, r.order, cfg["order"])
        keep.append(r)
    cols = sorted({resolve_nfe(solver, k) for k in nfes} | {r.nfe for r in keep})
    if not cols:
        raise UserError("nothing to compare: give --nfes (e.g. 4,6,8) and/or --runs with learned runs")
    for k in cols:
        check_solver_options({**cfg, "steps": k})
    clash = [r for r in keep if sum(1 for q in keep if q.label == r.label and q.nfe == r.nfe) > 1]
    for r in clash:  # one label twice at one NFE: tell them apart by run folder
        r.label = f"{r.label} ({r.path.parent.name})"

    z, c, uc = fresh_noise(cfg, model, n, device)
    score, label, notes = make_scorer(metric, cfg, model, device, z, c, uc, batch)
    spec = SolverSpec.from_cfg(cfg)
    tab = Table(metric, label, cols, notes=notes)
    for nfe in cols:
        ccfg = {**cfg, "steps": nfe}
        steps = steps_for_nfe(solver, nfe)
        names = baseline_names(ccfg, model)
        for name in sorted(names, key=lambda s: BASELINE_ORDER.index(s) if s in BASELINE_ORDER else 99):
            t = baseline_times(ccfg, model, name, steps, nfe)
            im = images(model, spec, t, None, z, c, uc, batch, device, desc=f"{name} NFE {nfe}")
            tab.cells.setdefault(name, {})[nfe] = score(im)
            log.info("NFE %d %-14s %.6g", nfe, name, tab.cells[name][nfe])
    for r in keep:
        rspec = SolverSpec.from_cfg({**cfg, "order": r.order if r.order is not None else cfg.get("order")})
        im = images(model, rspec, r.t, r.tp, z, c, uc, batch, device, desc=f"{r.label} NFE {r.nfe}")
        tab.cells.setdefault(r.label, {})[r.nfe] = score(im)
        log.info("NFE %d %-14s %.6g", r.nfe, r.label, tab.cells[r.label][r.nfe])
    order = f" order {cfg['order']}" if cfg.get("order") is not None else ""
    tab.caption = (f"{model.name}, {solver}{order}: {label}; {n} fresh noises "
                   f"(sampling seed {sampling_seed(cfg)}). "
                   "Lower is better; best per column in bold.")
    return tab


# --------------------------------------------------------------------------- output
def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}"


def to_markdown(tab: Table, command: str | None = None) -> str:
    head = "| discretization | " + " | ".join(f"NFE {k}" for k in tab.nfes) + " |"
    lines = [head, "|---|" + "---|" * len(tab.nfes)]
    best = {k: tab.best(k) for k in tab.nfes}
    for row, vals in tab.cells.items():
        cells = []
        for k in tab.nfes:
            s = _fmt(vals.get(k))
            cells.append(f"**{s}**" if best[k] == row and k in vals else s)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\n" + tab.caption
    for note in tab.notes:
        text += " " + note
    if command:
        text += f"\n\nMade with `{command}`."
    return text + "\n"


def to_csv(tab: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["discretization"] + [f"NFE {k}" for k in tab.nfes])
    for row, vals in tab.cells.items():
        w.writerow([row] + [repr(vals[k]) if k in vals else "" for k in tab.nfes])
    return buf.getvalue()


def plot(tab: Table, path: Path) -> None:
    from ld3.plots import plt, save_and_close

    fig, ax = plt.subplots(figsize=(6, 4))
    for row, vals in tab.cells.items():
        xs = [k for k in tab.nfes if k in vals]
        learned = row not in BASELINE_ORDER
        ax.plot(xs, [vals[k] for k in xs], "o-" if not learned else "*-", lw=2 if learned else 1,
                ms=11 if learned else 5, color="k" if learned and row == "LD3" else None, label=row)
    ax.set_xlabel("NFE")
    ax.set_ylabel({"fid": "FID", "digit_fd": "digit Frechet distance"}.get(tab.metric, "distance to teacher"))
    ax.set_title(tab.metric_label, fontsize=9)
    ax.set_xticks(tab.nfes)
    if all(v > 0 for vals in tab.cells.values() for v in vals.values()):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_and_close(fig, path)


def write_outputs(tab: Table, out_dir: Path, command: str | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {k: out_dir / f"comparison.{k}" for k in ("csv", "md", "png")}
    atomic_write_text(paths["csv"], to_csv(tab))
    atomic_write_text(paths["md"], to_markdown(tab, command))
    plot(tab, paths["png"])
    return paths
