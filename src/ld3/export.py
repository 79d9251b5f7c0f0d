"""Learned runs out of their folder: reading a run (``best_v2.pt`` + ``config.yml``) and exporting its
discretization to JSON for other samplers (diffusers, k-diffusion).

The JSON holds, for the learned times ``t_0 = T > ... > t_S = t_min`` (and the network times ``t'``):

- ``t``, ``t_prime``: the times of this code (the schedule's continuous time);
- ``lambda``, ``lambda_prime``: half log-SNR ``log(alpha / sigma)`` at them;
- ``sigmas``: the EDM noise level ``sigma / alpha`` at ``t_0 .. t_S`` followed by ``0`` (the list
  k-diffusion samplers and diffusers' ``sigmas=`` take; a sampler then makes ``len(sigmas) - 1 = S + 1``
  steps, the last one from ``sigma_min`` to 0; pass ``sigmas[:-1]`` to stop at ``sigma_min`` after S steps
  as LD3's own sampler does);
- for discrete-time models (``vp_discrete``, N training steps), ``timesteps``: the integer network times
  ``round(N (t_i - 1/N))`` (flow models: ``round(N t_i)``) of ``t_0 .. t_{S-1}``, descending, unique, in ``[1, N - 1]`` (no trailing 0: the
  last interval ends at ``t_min``, training step 0, which diffusers schedulers reach by themselves:
  ``final_sigmas_type="sigma_min"`` stops there, ``"zero"`` denoises fully);
- for EDM (``ve``) models, ``edm_karras_ramp``: the positions in [0, 1] that diffusers'
  ``EDMEulerScheduler(sigma_schedule="karras")`` maps to these sigmas (its ``sigmas=`` argument is that
  ramp, not noise levels);
- ``solver``, ``order``, ``nfe``, ``steps``, ``schedule``, ``decoupled`` and a ``note``: those formats
  evaluate the network at the step times, so they cannot carry ``t'`` when it differs from ``t``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml
from torch import Tensor

from ld3.config import UserError
from ld3.io import atomic_write_text
from ld3.samplers.schedules import NoiseSchedule
from ld3.samplers.solvers import SOLVERS, nfe_of

log = logging.getLogger("ld3")

FORMAT = "ld3-discretization/1"
EDM_RHO = 7.0


# --------------------------------------------------------------------------- reading a run
@dataclass
class LearnedRun:
    """A learned discretization and what it was trained for."""

    label: str
    path: Path  # the checkpoint (best_v2.pt)
    t: Tensor
    tp: Tensor
    solver: str
    order: int | None
    nfe: int
    run_cfg: dict

    @property
    def steps(self) -> int:
        return self.t.numel() - 1


def checkpoint_path(spec: str | Path) -> Path:
    """``RUN/best_v2.pt`` for a run folder, the path itself for a file."""
    p = Path(spec)
    if p.is_dir():
        if not (p / "best_v2.pt").is_file():
            raise UserError(f"run folder {p} has no best_v2.pt: train it with main.py first")
        return p / "best_v2.pt"
    if not p.is_file():
        raise UserError(f"learned run {p} not found: pass a run folder or its best_v2.pt")
    return p


def read_run(spec: str, schedule: NoiseSchedule, cfg: dict) -> LearnedRun:
    """A learned run from ``[label=]path`` (run folder or ``best_v2.pt``).

    Solver and order come from the run's ``config.yml`` (beside the checkpoint) when present, else
    from ``cfg``; the NFE follows from the solver and the number of times.
    """
    from ld3.runtime import load_times

    label, path = "", str(spec)
    head, sep, tail = path.partition("=")
    if sep and "/" not in head and not Path(path).exists():
        label, path = head.strip(), tail
    ck = checkpoint_path(path)
    t, tp = load_times(ck, SimpleNamespace(schedule=schedule))
    run_cfg: dict = {}
    if (ck.parent / "config.yml").is_file():
        try:
            run_cfg = yaml.safe_load((ck.parent / "config.yml").read_text()) or {}
        except yaml.YAMLError:
            log.warning("%s: unreadable config.yml; assuming the solver of the command line", ck.parent)
    solver = str(run_cfg.get("solver_name") or cfg["solver_name"])
    if solver not in SOLVERS:
        raise UserError(f"{ck}: unknown solver {solver!r} in its config.yml")
    order = run_cfg.get("order", cfg.get("order")) if run_cfg else cfg.get("order")
    nfe = nfe_of(solver, t.numel() - 1)
    if run_cfg.get("steps") is not None and int(run_cfg["steps"]) != nfe:
        log.info("%s: trained with --steps %s, which is %d NFE for %s with %d steps", ck, run_cfg["steps"],
                 nfe, solver, t.numel() - 1)
    return LearnedRun(label or "LD3", ck, t, tp, solver, None if order is None else int(order), nfe, run_cfg)


def schedule_from_config(cfg: dict) -> NoiseSchedule:
    """The model's noise schedule, without loading network weights when its family knows it from the config."""
    from ld3.models.registry import ModelError, get_family

    try:
        family = get_family(cfg.get("model"))
        if family.schedule is not None:
            return family.schedule(family.read(cfg))
    except (ModelError, ValueError) as e:
        raise UserError(str(e)) from None
    from ld3.runtime import setup_device_and_model

    return setup_device_and_model({**cfg, "device": "cpu"})[1].schedule


# --------------------------------------------------------------------------- converting
def diffusers_timesteps(t: Tensor, schedule: NoiseSchedule) -> tuple[list[int], float]:
    """Integer training steps of the network-evaluation times ``t_0 .. t_{S-1}`` of a discrete-time model.

    ``round(model_time(t_i))``, then moved as little as needed to be strictly decreasing within
    ``[1, N - 1]``. Returns the list and the largest move from the exact (fractional) step.
    """
    n_train = int(getattr(schedule, "N", 0))
    if not n_train:
        raise ValueError(f"schedule {schedule.name!r} has no discrete training steps")
    exact = schedule.model_time(t[:-1].double()).tolist()
    if len(exact) > n_train - 1:
        raise ValueError(f"{len(exact)} steps do not fit in {n_train - 1} distinct training steps")
    ts = [min(max(int(round(v)), 1), n_train - 1) for v in exact]
    for i in range(1, len(ts)):  # from the top: strictly decreasing, at most N - 1
        ts[i] = min(ts[i], ts[i - 1] - 1)
    if ts[-1] < 1:  # from the bottom: at least 1
        ts[-1] = 1
        for i in range(len(ts) - 2, -1, -1):
            ts[i] = max(ts[i], ts[i + 1] + 1)
    return ts, max(abs(a - b) for a, b in zip(ts, exact))


def karras_ramp(sigmas: list[float], sigma_min: float, sigma_max: float, rho: float = EDM_RHO) -> list[float]:
    """Positions r in [0, 1] with (s_max^(1/rho) + r (s_min^(1/rho) - s_max^(1/rho)))^rho = sigma."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(s ** (1 / rho) - a) / (b - a) for s in sigmas]


def solver_options(solver: str, run_cfg: dict) -> dict[str, Any]:
    """Every option that changes a step of ``solver`` (its declared options, final_denoise included), as
    the run used them: from its config.yml where set, else the solver's default."""
    info = SOLVERS[solver]
    return {o.name: (o.default if run_cfg.get(o.cfg_key) is None else run_cfg[o.cfg_key]) for o in info.all_options}


def export_dict(t: Tensor, tp: Tensor, schedule: NoiseSchedule, *, solver: str, order: int | None,
                source: str = "", model: str = "", options: dict | None = None) -> dict[str, Any]:
    """The JSON-ready export of a discretization (see the module docstring). ``options``: the solver's
    options the run used (``solver_options``; default: the solver's defaults)."""
    t, tp = t.double().cpu(), tp.double().cpu()
    steps = t.numel() - 1
    lam, lam_p = schedule.lambda_(t), schedule.lambda_(tp)
    sig = (schedule.sigma(t) / schedule.alpha(t)).tolist()  # EDM noise level (exact for VE: sigma = t)
    shift = float((lam_p - lam).abs().max())
    decoupled = shift > 1e-9
    out: dict[str, Any] = {
        "format": FORMAT,
        "source": source,
        "model": model,
        "solver": solver,
        "order": order,
        "solver_options": dict(options) if options is not None else solver_options(solver, {}),
        "steps": steps,
        "nfe": nfe_of(solver, steps),
        "schedule": {"name": schedule.name, "T": schedule.T, "t_min": schedule.t_min},
        "t": t.tolist(),
        "t_prime": tp.tolist(),
        "lambda": lam.tolist(),
        "lambda_prime": lam_p.tolist(),
        "sigmas": sig + [0.0],
        "decoupled": decoupled,
    }
    opts = out["solver_options"]
    notes = [f"Learned for {solver}" + (f" (order {order})" if order else "") +
             f", {steps} steps = {out['nfe']} NFE; it suits the same solver family best.",
             "solver_options: what changes a step (lower_order_final: the last steps at lower order, as "
             "k-diffusion's sample_dpmpp_2m does not and diffusers' DPMSolverMultistep does only below 15 "
             "steps (its lower_order_final=True); variant: UniPC's B(h), diffusers' solver_type 'bh1'/'bh2'; "
             f"final_denoise: {bool(opts.get('final_denoise'))}).",
             "sigmas = sigma/alpha at t_0..t_S then 0: k-diffusion / diffusers make len(sigmas) - 1 = S + 1 "
             "steps, the last from sigma_min to 0 (one more network call); pass sigmas[:-1] for the S "
             "learned steps ending at sigma_min."]
    n_train = int(getattr(schedule, "N", 0))
    if n_train:
        ts, moved = diffusers_timesteps(t, schedule)
        out["schedule"]["num_train_timesteps"] = n_train
        out["timesteps"] = ts
        out["timesteps_max_rounding"] = round(moved, 4)
        formula = "N t_i" if schedule.name == "flow" else "N (t_i - 1/N)"  # the schedule's network time
        notes.append(f"timesteps = round({formula}) for i < S (N = {n_train}), rounded by up to "
                     f"{moved:.2f} training steps; the last interval ends at t_min = training step 0: use "
                     "final_sigmas_type='sigma_min' to stop there as LD3 does ('zero' denoises fully).")
    if schedule.name == "ve":
        out["edm_karras_ramp"] = karras_ramp(sig, schedule.t_min, schedule.T)
        notes.append("edm_karras_ramp: pass as sigmas= to diffusers' EDMEulerScheduler(sigma_schedule="
                     f"'karras', sigma_min={schedule.t_min:g}, sigma_max={schedule.T:g}, rho={EDM_RHO:g}), "
                     "whose sigmas= are ramp positions, not noise levels.")
    if decoupled:
        notes.append(f"Decoupled network times: t' != t (up to {shift:.3g} in lambda). sigmas / timesteps "
                     "carry only t; diffusers and k-diffusion call the network at the step times, so the t' "
                     "refinement is lost there (use ld3's solvers with t_prime for LD3's exact sampler).")
    out["note"] = " ".join(notes)
    return out


def export_run(run: LearnedRun, schedule: NoiseSchedule, model: str = "") -> dict[str, Any]:
    return export_dict(run.t, run.tp, schedule, solver=run.solver, order=run.order, source=str(run.path),
                       model=model, options=solver_options(run.solver, run.run_cfg))


def write_json(d: dict, path: str | Path) -> Path:
    p = Path(path)
    atomic_write_text(p, json.dumps(d, indent=1) + "\n")
    return p


def times_from_export(d: dict | str | Path) -> tuple[Tensor, Tensor]:
    """(t, t') of an exported JSON (a dict or a file)."""
    if not isinstance(d, dict):
        d = json.loads(Path(d).read_text())
    if d.get("format") != FORMAT:
        raise ValueError(f"not an LD3 export (format {d.get('format')!r}, expected {FORMAT!r})")
    t = torch.tensor(d["t"], dtype=torch.float64)
    tp = torch.tensor(d.get("t_prime", d["t"]), dtype=torch.float64)
    if t.shape != tp.shape or not bool(torch.all(t[1:] < t[:-1])) or not all(map(math.isfinite, d["t"])):
        raise ValueError("exported times are not a strictly decreasing list of equal-length t and t_prime")
    return t, tp
