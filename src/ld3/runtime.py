"""What the command-line tools share: checking options, building the model, resolving times."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import Tensor

from ld3.config import UserError
from ld3.io import pick_device, set_threads
from ld3.models.base import Model
from ld3.samplers.discretizations import ALL_SKIP_TYPES, SKIP_TYPES, get_discretization
from ld3.samplers.solvers import SOLVERS, get_solver, nfe_of, steps_for_nfe

log = logging.getLogger("ld3")

TIME_MODES = ("lambda", "time")


def check_solver_options(cfg: dict, key_steps: str = "steps") -> int:
    """Validate solver_name / order / steps / skip_type; return S (intervals of the discretization)."""
    name = cfg["solver_name"]
    if name not in SOLVERS:
        raise UserError(f"unknown solver_name {name!r}; choose from {', '.join(SOLVERS)}")
    info = get_solver(name)
    order = cfg.get("order")
    if order is not None and not info.min_order <= int(order) <= info.max_order:
        raise UserError(f"order {order} is not supported by {name} (orders {info.min_order}-{info.max_order}); "
                        f"set --order within that range")
    nfe = int(cfg[key_steps])
    min_nfe = info.min_nfe(int(order or info.default_order))
    if nfe < min_nfe:
        raise UserError(f"--{key_steps} {nfe} is too small for {name}: it needs at least {min_nfe} NFE")
    skip = cfg.get("skip_type")
    if skip is not None and skip not in ALL_SKIP_TYPES:
        raise UserError(f"unknown skip_type {skip!r}; choose from {', '.join(ALL_SKIP_TYPES)}")
    tm = cfg.get("time_mode")
    if tm not in (None, "auto") + TIME_MODES:
        raise UserError(f"unknown time_mode {tm!r}; choose lambda or time")
    s = steps_for_nfe(name, nfe)
    if nfe_of(name, s) != nfe:
        log.warning("%s uses %d network evaluations for %d steps (NFE budget %d)", name, nfe_of(name, s), s, nfe)
    return s


def setup_device_and_model(cfg: dict) -> tuple[torch.device, Model]:
    from ld3.models.registry import ModelError, build_model, get_family

    device = pick_device(cfg.get("device"))
    try:
        family = get_family(cfg.get("model"))
        n = set_threads(cfg.get("threads"), small_model=family.small(family.read(cfg)))
        model = build_model(cfg, device)
    except ModelError as e:
        raise UserError(str(e)) from None
    log.info("model %s on %s (%d CPU threads), latent %s", model.name, device, n, tuple(model.latent_shape))
    return device, model


def time_mode(cfg: dict, model: Model) -> str:
    tm = cfg.get("time_mode")
    return model.time_mode if tm in (None, "auto") else tm


def gits_dataset(cfg: dict) -> str:
    """The GITS table of a config: ``dataset`` if set, else what the paper's code infers from the model."""
    from ld3.models.registry import ModelError, get_family

    if cfg.get("dataset"):
        return str(cfg["dataset"])
    try:
        family = get_family(cfg.get("model"))
        if family.gits_dataset is None:
            raise ValueError(f"no GITS table for model {family.name!r}; tables exist for edm (cifar10, ffhq, "
                             "afhqv2), latent_diff (lsun) and conditioned_latent_diff (sd)")
        return family.gits_dataset(family.read(cfg))
    except (ValueError, ModelError) as e:
        raise UserError(f"{e}; or set --dataset") from None


def baseline_times(cfg: dict, model: Model, skip_type: str | None, steps: int, nfe: int) -> Tensor:
    if skip_type is None:
        raise UserError("--skip_type is required: edm, time_uniform, time_quadratic, logSNR or gits")
    if cfg.get("arithmetic") == "paper" and skip_type in SKIP_TYPES:  # the paper's grids, in its float32
        from ld3.samplers.paper import time_steps

        return time_steps(skip_type, model.schedule, steps)
    try:
        return get_discretization(skip_type, model.schedule, steps, solver_name=cfg["solver_name"], nfe=nfe,
                                  dataset=gits_dataset(cfg) if skip_type == "gits" else "",
                                  shift=flow_shift_of(cfg, model))
    except ValueError as e:
        raise UserError(str(e)) from None


def flow_shift_of(cfg: dict, model: Model) -> float:
    """The shift of ``sd3_shift``: ``--flow_shift`` (SD3: 3), or with ``auto`` Flux's e^mu for the model's
    number of image tokens (``info['image_seq_len']``, else latent H W / 4: 2x2 patches)."""
    from ld3.samplers.discretizations import flux_mu

    v = str(cfg.get("flow_shift") if cfg.get("flow_shift") is not None else "3").strip().lower()
    if v != "auto":
        return float(v)
    seq = model.info.get("image_seq_len") or math.prod(model.latent_shape[-2:]) // 4
    return math.exp(flux_mu(int(seq)))


def gits_prior(cfg: dict, model: Model, steps: int) -> Tensor:
    """The prior schedule (``--match_prior``, ``--use_gits``): ``--gits_ts`` if given, else the GITS table."""
    from ld3.samplers.discretizations import from_edm_sigmas

    if cfg.get("gits_ts"):
        try:
            sig = [float(s) for s in str(cfg["gits_ts"]).replace("[", "").replace("]", "").split(",") if s.strip()]
        except ValueError:
            raise UserError("--gits_ts must be comma-separated numbers (EDM sigmas, decreasing)") from None
        if len(sig) != steps + 1:
            raise UserError(f"--gits_ts has {len(sig)} values; {steps + 1} are needed for {steps} steps")
        return from_edm_sigmas(model.schedule, sig)
    return baseline_times(cfg, model, "gits", steps, int(cfg["steps"]))


def derived_hparams(cfg: dict, latent_shape, nfe: int) -> tuple[float, float, float]:
    """(bound, shift_lr, lr_time_2) as the paper's code resolves them, rounded to 8 decimals."""
    d = math.prod(latent_shape)
    bound = float(cfg["prior_bound"]) if cfg.get("fix_bound") else 0.001 * d / nfe**2
    shift_lr = float(cfg["shift_lr"]) if cfg.get("shift_lr") is not None else 12.0 / nfe
    lr2 = float(cfg["lr_time_2"]) / nfe
    return round(bound, 8), round(shift_lr, 8), round(lr2, 8)


def run_name(cfg: dict, bound: float, lr2: float) -> str:
    name = (f"{cfg['solver_name']}-N{cfg['steps']}-b{bound}-{cfg['loss_type']}-lr2{lr2}"
            f"rv1{cfg['training_rounds_v1']}-rv2{cfg['training_rounds_v2']}-seed{cfg['seed']}")
    if cfg.get("no_v1"):
        name += "-no_v1_only_v2"
    if cfg.get("match_prior"):
        name += "-match_prior"
    return name


def data_folder_name(cfg: dict, skip_label: str | None = None) -> str:
    return f"{cfg['solver_name']}_NFE{cfg['steps']}_{skip_label or cfg['skip_type']}_seed{cfg['seed']}"


def check_positive(cfg: dict, *keys: str) -> None:
    for k in keys:
        if cfg.get(k) is None or int(cfg[k]) < 1:
            raise UserError(f"--{k} must be >= 1, got {cfg.get(k)}")


def load_times(path: str | Path, model: Model) -> tuple[Tensor, Tensor]:
    """(t, t') of a learned checkpoint (or of a run folder's best_v2.pt); a bad file is a UserError."""
    from ld3.discretization import times_from_checkpoint
    from ld3.io import safe_load

    path = Path(path)
    if path.is_dir():  # a run folder: its best checkpoint
        path = path / "best_v2.pt"
    ck = safe_load(path, "--load_from checkpoint")
    try:
        t, tp = times_from_checkpoint(ck)
    except ValueError as e:
        raise UserError(f"--load_from {path}: {e}") from None
    sch = model.schedule
    if abs(float(t[0]) - sch.T) > 1e-6 * max(1.0, sch.T) or abs(float(t[-1]) - sch.t_min) > 1e-6 * max(1.0, sch.t_min):
        raise UserError(f"--load_from {path}: times run from {float(t[0]):.6g} to {float(t[-1]):.6g} but the model's "
                        f"schedule runs from {sch.T:.6g} to {sch.t_min:.6g}; it was learned for another model")
    return t, tp


def check_learned_run(cfg: dict, path: str | Path, steps: int) -> int:
    """Warn where sampling options differ from those a learned run was trained with; returns its NFE.

    The NFE follows from the number of learned times; the solver options are read from the run's
    config.yml when it is there (a checkpoint of the paper's code has none).
    """
    import yaml

    nfe = nfe_of(cfg["solver_name"], steps)
    if int(cfg["steps"]) != nfe:
        log.warning("--load_from holds %d steps (NFE %d with %s): --steps %s is ignored", steps, nfe,
                    cfg["solver_name"], cfg["steps"])
    path = Path(path)
    run_cfg = (path if path.is_dir() else path.parent) / "config.yml"
    if run_cfg.is_file():
        learned = yaml.safe_load(run_cfg.read_text()) or {}
        for key in ("solver_name", "order", *(o.cfg_key for o in get_solver(cfg["solver_name"]).all_options)):
            if key in learned and learned[key] is not None and cfg.get(key) is not None and learned[key] != cfg[key]:
                log.warning("the learned run used %s=%s; sampling with %s=%s", key, learned[key], key, cfg[key])
    return nfe
