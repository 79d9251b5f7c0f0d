"""Configuration: a yml file gives the default of every argument; command-line flags override it.

One table (``OPTIONS``) names every option, its type, default and help; ``gen_data.py``,
``main.py`` and ``sample.py`` build their parsers from it. A yml key that is not in the
table is kept (and passed on) but warned about, with the nearest known key.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ld3.errors import PeerFailed, UserError  # UserError re-exported: ld3.config.UserError

log = logging.getLogger("ld3")


def str2bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def _int(v: Any) -> int:
    """An integer, strictly: 4 or "4" (or 4.0 from a yml), never 4.7 or a boolean."""
    if isinstance(v, bool):
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}")
    try:
        return int(str(v).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None


_int.__name__ = "int"


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None


_float.__name__ = "float"


def _shift(v: Any) -> str:
    """--flow_shift: a number > 0, or auto (Flux's resolution-dependent shift)."""
    if str(v).strip().lower() == "auto":
        return "auto"
    x = _float(v)
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or auto, got {v!r}")
    return str(x)


_shift.__name__ = "shift"


def _none_or(tp):
    def conv(v):
        if v is None or str(v).lower() in ("none", "null", ""):
            return None
        return tp(v)

    conv.__name__ = tp.__name__
    return conv


@dataclass(frozen=True)
class Opt:
    """One option: its type, default, help, allowed values, and for numbers the allowed range
    (``lo``/``hi``, ``lo_open``: strictly above ``lo``); numbers must be finite."""

    type: Any
    default: Any
    help: str
    choices: tuple | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def check(self, name: str, v: Any, where: str) -> None:
        """Stop with one line when ``v`` is outside the option's range (``where``: the flag or the yml)."""
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            return
        if not math.isfinite(v):
            raise UserError(f"{where} {v!r}: must be a finite number{self._range_text()}")
        bad = (self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)) or \
            (self.hi is not None and v > self.hi)
        if bad:
            raise UserError(f"{where} {v!r}: must be{self._range_text() or ' in range'}")

    def _range_text(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"<= {self.hi:g}")
        return " " + " and ".join(parts) if parts else ""


# name -> Opt. Keys and defaults follow the paper's code; ours are marked (ours).
OPTIONS: dict[str, Opt] = {
    # model (the options each model family reads come from ld3.models.registry, below)
    "model": Opt(str, "digits_gmm", "model family"),
    "ckp_path": Opt(_none_or(str), None, "checkpoint file or folder of the pre-trained model"),
    "dataset": Opt(_none_or(str), None, "which GITS table (cifar10, ffhq, afhqv2, lsun, sd); default: inferred "
                   "from model and ckp_path as the paper's code does"),
    "time_mode": Opt(str, "auto", "LD3 parameterization: lambda (pixel/EDM), time (latent), auto (the model's)",
                     ("auto", "lambda", "time")),
    "device": Opt(_none_or(str), None, "cpu, cuda, cuda:1 ... (default: cuda when available)"),
    "low_gpu": Opt(str2bool, False, "activation checkpointing of each network call to save memory"),
    "threads": Opt(_none_or(_int), None, "torch CPU threads (default: chosen for the model size) (ours)"),
    # solver
    "solver_name": Opt(str, "uni_pc", "student / sampling solver"),
    "steps": Opt(_int, 10, "NFE (number of network evaluations)"),
    "order": Opt(_none_or(_int), None, "solver order (default: the solver's own)"),
    "skip_type": Opt(str, "edm", "baseline discretization: edm, time_uniform, time_quadratic, logSNR, gits"),
    # (each solver's own options come from ld3.samplers.solvers, below)
    "flow_shift": Opt(_shift, "3.0", "shift of the sd3_shift grid for rectified-flow models: a number (SD3: 3) or "
                      "auto (Flux: e^mu, mu from the number of image tokens) (ours)"),
    "arithmetic": Opt(str, "fast", "solver and schedule arithmetic: fast (ours) or paper (the paper code's float32 "
                      "coefficients and float64 states, to its numbers' rounding)", ("fast", "paper")),
    "learn": Opt(str2bool, False, "gen_data: sample with the learned run that main.py's options name"),
    "fid_folder": Opt(_none_or(str), None, "folder of FID results"),
    "ref_path": Opt(_none_or(str), None, "FID reference statistics (.npz with mu, sigma)"),
    "num_multi_steps_fid": Opt(_none_or(_int), None, "unused (kept for the paper's configs)"),
    "load_from": Opt(_none_or(str), None, "sample with a learned discretization (best_v2.pt)"),
    # gen_data
    "total_samples": Opt(_int, 100, "number of teacher samples"),
    "sampling_batch_size": Opt(_int, 10, "batch size of teacher sampling"),
    "data_dir": Opt(str, "train_data", "gen_data: root folder; main: the generated folder"),
    "save_pt": Opt(str2bool, False, "save latent_XXXXXX.pt files"),
    "save_png": Opt(str2bool, False, "save XXXXXX.png images"),
    "seed": Opt(_int, 0, "random seed"),
    "noise": Opt(str, "index", "gen_data: teacher noise per sample index, the same for any batch size (ours), or "
                 "paper (torch.manual_seed(seed), then one randn per batch, as the paper's code)", ("index", "paper")),
    "paper_compat": Opt(str2bool, False, "reproduce the paper's code: every departure of PAPER_VALUES goes back to "
                        "the paper's behaviour (flags given on the command line still win)"),
    # main: data
    "num_train": Opt(_int, 50, "number of training samples"),
    "num_valid": Opt(_int, 50, "number of validation samples"),
    "main_train_batch_size": Opt(_int, 1, "training batch size"),
    "main_valid_batch_size": Opt(_int, 10, "validation batch size"),
    "log_path": Opt(str, "logs", "root folder of runs"),
    # main: method
    "loss_type": Opt(str, "LPIPS", "LPIPS, L2 or L1", ("LPIPS", "L2", "L1")),
    "lpips_size": Opt(_int, 32, "LPIPS: images smaller than this are resized up to it (the paper's sizes, 32 and "
                      "up, are used as they are) (ours)"),
    "trainer": Opt(str, "full_batch", "how the times are learned: full_batch (ours): Adam on the exact gradient of "
                   "all learning samples, fb_iters_v1 + fb_iters_v2 iterations with a cosine-decaying rate; rounds "
                   "(the paper's code): 2-sample RMSprop/SGD steps over training_rounds_v1 + training_rounds_v2 "
                   "rounds with latent moves, validation and patience. Measured: README, Departures",
                   ("full_batch", "rounds")),
    "fb_iters_v1": Opt(_int, 40, "full_batch: iterations of phase 1 (params1: the times t) (ours)"),
    "fb_iters_v2": Opt(_int, 40, "full_batch: iterations of phase 2 (params1 and params2: t and t') (ours)"),
    "fb_lr_1": Opt(_float, 0.1, "full_batch: Adam rate of phase 1, falling to 0 along a half cosine (ours)"),
    "fb_lr_2": Opt(_float, 0.05, "full_batch: Adam rate of phase 2, falling to 0 along a half cosine (ours)"),
    "fb_chunk": Opt(_none_or(_int), None, "full_batch: samples per forward/backward pass (default: "
                    "main_train_batch_size, the batch the config's memory was sized for); the chunks' gradients are "
                    "summed, so the step is the same for any chunk: raise it where memory allows, it runs faster "
                    "(the embedded configs: 50) (ours)"),
    "fb_robust": Opt(_float, 2.0, "full_batch: the objective is the mean of 2c(sqrt(1 + d/c) - 1) over the "
                     "samples' distances d, with c = fb_robust times their median at the starting times: d for most "
                     "samples, 2 sqrt(c d) for the few far from the teacher, which the plain mean fits at the cost of "
                     "fresh noise; 0: the plain mean of d (ours)"),
    "training_rounds_v1": Opt(_int, 2, "rounds of phase 1 (params1 only)"),
    "training_rounds_v2": Opt(_int, 5, "rounds of phase 2 (params1 and params2)"),
    "no_v1": Opt(str2bool, False, "skip phase 1 and learn only params2"),
    "lr_time_1": Opt(_float, 0.005, "RMSprop learning rate of params1"),
    "lr_time_2": Opt(_float, 0.1, "SGD learning rate of params2 (divided by steps)"),
    "momentum_time_1": Opt(_float, 0.9, "RMSprop momentum of params1"),
    "weight_decay_time_1": Opt(_float, 0.0, "RMSprop weight decay of params1"),
    "min_lr_time_1": Opt(_float, 5e-5, "floor of lr_time_1"),
    "min_lr_time_2": Opt(_float, 1e-6, "floor of lr_time_2"),
    "lr_time_decay": Opt(_float, 0.8, "learning-rate decay after patience runs out"),
    "patient": Opt(_int, 5, "validation checks without improvement before decay"),
    "lr2_patient": Opt(_int, 5, "stop after the phase-2 rate hit its floor this many times"),
    "shift_lr": Opt(_none_or(_float), None, "SGD learning rate of the latents z' (default 12 / steps)"),
    "shift_lr_decay": Opt(_float, 0.5, "decay of shift_lr when no validation latent moved in a round"),
    "prior_bound": Opt(_float, 0.0, "radius of the ball around z (used with fix_bound)"),
    "fix_bound": Opt(str2bool, False, "keep prior_bound instead of 0.001 d / steps^2"),
    "win_rate": Opt(_float, 0.5, "window of t' as a share of the smallest gap"),
    "match_prior": Opt(str2bool, False, "first fit params1 to the GITS prior schedule"),
    "use_gits": Opt(str2bool, False, "use the GITS table as the prior (gen_data: sample with it)"),
    "gits_ts": Opt(_none_or(str), None, "comma-separated EDM sigmas of a prior schedule"),
    "valid_every": Opt(_int, 10, "validate after every k optimizer steps (ours; the paper's code: 1. Measured on "
                       "the digits U-Net, 10 is as good on fresh noise and twice as fast: see README, Performance)"),
    "valid_use": Opt(str, "train", "what the num_valid samples are for: train (ours): learned from with the num_train "
                     "ones, and the best checkpoint is chosen on all of them; select (the paper's code): only "
                     "choosing the best checkpoint. Measured: README, Departures", ("train", "select")),
    "eval_on_one": Opt(str2bool, False, "validate on the first validation batch only until the first patience "
                       "event (the paper's code: true)"),
    "latent_step": Opt(str, "sample", "z' steps on each sample's own loss (ours) or on the batch-mean loss "
                       "(mean: the paper's code, the step then shrinks with the batch size)", ("sample", "mean")),
    "latent_check": Opt(str, "same_times", "a latent move is kept if the loss went down under the times that gave "
                        "its gradient (ours), or under the times after the step (new_times: the paper's code)",
                        ("same_times", "new_times")),
    "reload_latents": Opt(str2bool, False, "a patience reload also restores the latents of the best state, as "
                          "the paper's code does with its pickled datasets"),
    "window": Opt(str, "schedule", "window of t' in lambda mode: win_rate x the smallest gap of the schedule "
                  "(ours) or of the raw params1 numbers (params: the paper's code, t' = t until params1 move)",
                  ("schedule", "params")),
    "order_rng": Opt(str, "private", "generator of the training order: private (seeded by --seed; ours) or global "
                     "(torch's, seeded by --seed at start, as the paper's DataLoaders)", ("private", "global")),
    "visualize": Opt(str2bool, True, "write plots into the run folder"),
    "resume": Opt(str2bool, False, "continue a stopped run from its last state (ours)"),
    "overwrite": Opt(str2bool, False, "replace what a data or run folder holds when another model, other data "
                     "or other options made it (without it, that stops with the option that differs)"),
    "sampling_seed": Opt(_none_or(_int), None, "seed of fresh evaluation noise, drawn apart from the teacher noise (default: seed)"),
    "teacher": Opt(_none_or(str), None, "the teacher to run for distances on fresh noise, as key=value pairs "
                   "(solver_name=uni_pc,steps=20,skip_type=edm,order=3,unipc_variant=bh1); default: the data "
                   "folder's gen_config.yml"),
    "eval_fresh": Opt(_int, 0, "after training, compare with baselines on this many fresh noises (ours)"),
    "plugins": Opt(_none_or(str), None, "comma-separated .py files (or modules) to import first: the model "
                   "families, solvers and losses they register become available (README: Architecture) (ours)"),
}


def _cli_type(tp: type, default: Any):
    conv = {int: _int, float: _float, bool: str2bool, str: str}[tp]
    return _none_or(conv) if default is None else conv


def _family_options() -> dict[str, Opt]:
    """The options the model families declare, as command-line options (help: which families read it)."""
    from ld3.models.registry import FAMILIES, family_options

    out: dict[str, Opt] = {}
    for name, (o, fams) in family_options().items():
        who = "all models" if len(fams) == len(FAMILIES) else ", ".join(fams)
        out[name] = Opt(_cli_type(o.type, o.default), o.default, f"{o.help} [{who}]", o.choices, o.lo)
    return out


def _solver_options() -> dict[str, Opt]:
    """The options the solvers declare, by config key (help: which solvers read it; an option whose
    default differs between solvers defaults to None: each solver's own)."""
    from ld3.samplers.solvers import SOLVERS

    out: dict[str, Opt] = {}
    uses: dict[str, list] = {}
    for s in SOLVERS.values():
        for o in s.all_options:
            uses.setdefault(o.cfg_key, []).append((s.name, o))
    for key, pairs in uses.items():
        o = pairs[0][1]
        defaults = {p[1].default for p in pairs}
        who = "all solvers" if len(pairs) == len(SOLVERS) else ", ".join(p[0] for p in pairs)
        if len(defaults) == 1:
            out[key] = Opt(_cli_type(o.type, o.default), o.default, f"{o.help} [{who}]", o.choices)
        else:
            own = "; ".join(f"{p[0]}: {p[1].default}" for p in pairs)
            out[key] = Opt(_cli_type(o.type, None), None, f"{o.help} [default: the solver's own ({own})]",
                           o.choices)
    return out


def _model_help() -> str:
    from ld3.models.registry import FAMILIES

    return "model family: " + "; ".join(f"{n} ({f.help})" if f.help else n for n, f in FAMILIES.items())


def sync_declared_options() -> None:
    """Put what the registered model families and solvers declare into ``OPTIONS`` and the ``--help``
    groups: at import, and again whenever a command parses (for families registered since)."""
    fam, sol = _family_options(), _solver_options()
    OPTIONS.update(fam)
    OPTIONS.update(sol)
    OPTIONS["model"] = Opt(str, "digits_gmm", _model_help())
    from ld3.losses import LOSSES

    OPTIONS["loss_type"] = Opt(str, "LPIPS", "distance to the teacher: " + ", ".join(LOSSES), tuple(LOSSES))
    HELP_GROUPS["model"] = ("model", "ckp_path", *fam, "dataset", "device", "low_gpu", "threads")
    HELP_GROUPS["solver"] = ("solver_name", "steps", "order", "skip_type", "flow_shift", *sol, "arithmetic", "load_from", "learn",
                             "use_gits", "gits_ts")


# (lo, hi, lo_open) of the numeric options; every number must also be finite
RANGES: dict[str, tuple] = {
    "threads": (1, None, False), "steps": (1, None, False),
    "order": (1, None, False), "total_samples": (1, None, False), "sampling_batch_size": (1, None, False),
    "seed": (0, None, False), "num_train": (1, None, False), "num_valid": (1, None, False),
    "main_train_batch_size": (1, None, False), "main_valid_batch_size": (1, None, False),
    "lpips_size": (1, None, False), "training_rounds_v1": (0, None, False), "training_rounds_v2": (0, None, False),
    "lr_time_1": (0, None, True), "lr_time_2": (0, None, True), "momentum_time_1": (0, 1, False),
    "weight_decay_time_1": (0, None, False), "min_lr_time_1": (0, None, False), "min_lr_time_2": (0, None, False),
    "lr_time_decay": (0, 1, True), "patient": (1, None, False), "lr2_patient": (1, None, False),
    "shift_lr": (0, None, False), "shift_lr_decay": (0, 1, True), "prior_bound": (0, None, False),
    "win_rate": (0, 1, False), "valid_every": (1, None, False), "sampling_seed": (0, None, False),
    "eval_fresh": (0, None, False), "fb_iters_v1": (0, None, False), "fb_iters_v2": (0, None, False),
    "fb_lr_1": (0, None, True), "fb_lr_2": (0, None, True), "fb_chunk": (1, None, False),
    "fb_robust": (0, None, False),
}
for _k, (_lo, _hi, _open) in RANGES.items():
    OPTIONS[_k] = Opt(OPTIONS[_k].type, OPTIONS[_k].default, OPTIONS[_k].help, OPTIONS[_k].choices, _lo, _hi, _open)


def check_values(cfg: dict, table: dict[str, "Opt"], from_cli: set[str], yml_path: str | None) -> None:
    """Every option's value against its declared range, before anything is written; plus the rules
    that tie options together."""
    for k, opt in table.items():
        if k in cfg:
            opt.check(k, cfg[k], f"--{k}" if k in from_cli else f"{yml_path or 'the config'}: {k}:")
    rounds = cfg.get("trainer", "rounds") == "rounds"
    what, unit = ("training_rounds", "round") if rounds else ("fb_iters", "iteration")
    v1, v2 = cfg.get(f"{what}_v1"), cfg.get(f"{what}_v2")
    if isinstance(v1, int) and isinstance(v2, int):
        if (0 if cfg.get("no_v1") else v1) + v2 < 1 and not cfg.get("match_prior"):
            raise UserError(f"{what}_v1 + {what}_v2 is 0 (with --no_v1: {what}_v2): nothing would be learned; "
                            f"give at least one {unit} (zero only with --match_prior, to save the fitted prior)")
    ts = cfg.get("gits_ts")
    if ts:
        try:
            vals = [float(x) for x in str(ts).split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--gits_ts {ts!r}: give comma-separated numbers (EDM sigmas, decreasing)") from None
        if not all(math.isfinite(x) and x >= 0 for x in vals):
            raise UserError(f"--gits_ts {ts!r}: the sigmas must be finite and >= 0")


PAPER_VALUES: dict[str, Any] = {
    "trainer": "rounds", "valid_every": 1, "valid_use": "select", "eval_on_one": True, "latent_step": "mean", "latent_check": "new_times",
    "reload_latents": True, "window": "params", "order_rng": "global", "arithmetic": "paper",
    "dpmpp_3m": "paper", "noise": "paper",
}
"""What ``--paper_compat`` sets: the paper code's value of every option where we depart from it."""


# --help: each command lists only its own options, grouped; the others are accepted (one yml serves all three)
HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "model": (),  # filled by sync_declared_options: the core model keys and every family's options
    "solver": (),  # likewise with every solver's options
    "teacher data": ("total_samples", "sampling_batch_size", "data_dir", "save_pt", "save_png", "seed", "noise"),
    "training data": ("data_dir", "num_train", "num_valid", "main_train_batch_size", "main_valid_batch_size",
                      "log_path", "seed", "resume"),
    "learning": ("loss_type", "lpips_size", "time_mode", "trainer", "fb_iters_v1", "fb_iters_v2", "fb_lr_1", "fb_lr_2", "fb_chunk",
                 "fb_robust", "training_rounds_v1", "training_rounds_v2", "no_v1",
                 "lr_time_1", "lr_time_2", "momentum_time_1", "weight_decay_time_1", "min_lr_time_1",
                 "min_lr_time_2", "lr_time_decay", "patient", "lr2_patient", "shift_lr", "shift_lr_decay",
                 "prior_bound", "fix_bound", "win_rate", "match_prior", "valid_every", "valid_use", "eval_on_one", "latent_step",
                 "latent_check", "reload_latents", "window", "order_rng", "visualize", "eval_fresh", "sampling_seed"),
    "sampling": ("data_dir", "sampling_batch_size", "sampling_seed", "teacher", "ref_path", "fid_folder",
                 "save_png", "seed"),
    "reproducibility and reuse": ("paper_compat", "overwrite"),
    "extending": ("plugins",),
}
sync_declared_options()
SCRIPT_GROUPS: dict[str, tuple[str, ...]] = {
    "gen_data": ("model", "solver", "teacher data", "reproducibility and reuse", "extending"),
    "main": ("model", "solver", "training data", "learning", "reproducibility and reuse", "extending"),
    "sample": ("model", "solver", "sampling", "reproducibility and reuse", "extending"),
}


def _add_flag(p, name: str, opt: Opt | None, default: Any = argparse.SUPPRESS, shown: Any = None,
              hidden: bool = False) -> None:
    """One flag; ``shown`` is the value the run would use (the yml's, else the table's), for --help."""
    if opt is None:
        p.add_argument(f"--{name}", default=default, help=argparse.SUPPRESS if hidden else "(from the yml file)")
        return
    kw: dict[str, Any] = dict(default=default,
                              help=argparse.SUPPRESS if hidden else f"{opt.help} [now {shown!r}]")
    if opt.type is str2bool:
        kw.update(nargs="?", const=True, type=str2bool, metavar="BOOL")
    else:
        kw.update(type=opt.type)
        if opt.choices:
            kw["choices"] = opt.choices
    p.add_argument(f"--{name}", **kw)


def load_yml(path: str | None) -> dict:
    if not path:
        raise UserError("--all_config is required: pass a yml file, e.g. --all_config configs/digits.yml")
    p = Path(path)
    if not p.is_file():
        from ld3.resources import shipped

        p = shipped(p) or p  # the paper's configs/*.yml, packaged: the same command works from any folder
    if not p.is_file():
        raise UserError(f"config file {path} not found: pass an existing yml, e.g. --all_config configs/digits.yml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read config {path}: {str(e).splitlines()[0]}; fix the yml syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of key: value lines")
    if not data:
        raise UserError(f"config {path} is empty: it must give the options of a run, e.g. copy configs/digits.yml")
    return data


def load_plugins(spec: Any) -> list[str]:
    """Import the plugins ``spec`` names (comma-separated .py files, relative to the working directory, or
    importable modules): what they register (model families, solvers, losses) is then available."""
    import importlib
    import importlib.util

    names = [s.strip() for s in (spec if isinstance(spec, list) else str(spec or "").split(",")) if str(s).strip()]
    for name in names:
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise UserError(f"--plugins: {name} not found (a .py file, relative to {Path.cwd()})")
                mod_name = f"ld3_plugin_{path.stem}"
                if mod_name in sys.modules:
                    continue
                spec_ = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(spec_)
                sys.modules[mod_name] = module
                try:
                    spec_.loader.exec_module(module)
                except BaseException:
                    del sys.modules[mod_name]
                    raise
            else:
                importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"--plugins: cannot import {name} ({e}); give the path of its .py file") from None
    return names


def parse_config(argv: list[str] | None = None, description: str = "", extra: dict[str, Opt] | None = None,
                 defaults: dict[str, Any] | None = None, script: str | None = None) -> dict[str, Any]:
    """Resolve options: table defaults < yml (``--all_config``) < command line. Returns a dict.

    ``script`` (gen_data, main, sample): its --help lists only its option groups (all are accepted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--all_config", default=None)
    pre.add_argument("--plugins", default=None)
    known, _ = pre.parse_known_args(argv)
    yml: dict = {}
    if known.all_config is not None or not any(a in ("-h", "--help") for a in argv):
        yml = load_yml(known.all_config)
    load_plugins(known.plugins if known.plugins is not None else yml.get("plugins"))
    sync_declared_options()
    table = dict(OPTIONS)
    table.update(extra or {})

    parser = argparse.ArgumentParser(usage="%(prog)s --all_config FILE [--option value ...]", description=description, epilog=(
        f"[now ...]: the value of {known.all_config}, else the built-in default." if known.all_config else
        "Give --all_config FILE --help to see the values that file sets."))
    parser.add_argument("--all_config", required=False, help="yml file with the default of every argument (mandatory)")

    def shown(name: str, opt: Opt) -> Any:
        return yml[name] if yml.get(name) is not None else opt.default

    added: set[str] = set()
    if script in SCRIPT_GROUPS:
        for title in SCRIPT_GROUPS[script]:
            group = parser.add_argument_group(title)
            for name in HELP_GROUPS[title]:
                if name in table and name not in added:
                    _add_flag(group, name, table[name], shown=shown(name, table[name]))
                    added.add(name)
        if extra:
            group = parser.add_argument_group(f"{script}.py")
            for name, opt in extra.items():
                if name not in added:
                    _add_flag(group, name, opt, shown=shown(name, opt))
                    added.add(name)
    for name, opt in table.items():  # every other option: accepted, not listed
        if name not in added:
            _add_flag(parser, name, opt, shown=shown(name, opt), hidden=script in SCRIPT_GROUPS)
    for key in yml:
        if key not in table:
            near = difflib.get_close_matches(key, list(table), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            log.warning("config key %r is not a known option%s; it is kept but unused", key, hint)
            _add_flag(parser, key, None, hidden=True)

    def fail(msg: str) -> None:
        msg = msg.splitlines()[0]
        if msg.startswith("unrecognized arguments:"):
            flags = [a.split("=")[0] for a in msg.split(":", 1)[1].split() if a.startswith("--")]
            for f in flags:
                near = difflib.get_close_matches(f[2:], list(table), n=1)
                if near:
                    msg += f" (did you mean --{near[0]}?)"
                    break
            msg += "; see --help"
        raise UserError(msg)

    parser.error = fail  # type: ignore[assignment]
    args = vars(parser.parse_args(argv))

    cfg: dict[str, Any] = {k: o.default for k, o in table.items()}
    cfg.update(defaults or {})
    for k, v in yml.items():
        opt = table.get(k)
        if opt is not None and v is not None:
            try:
                v = opt.type(v)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise UserError(f"config key {k}: cannot read {v!r} as {getattr(opt.type, '__name__', opt.type)}")
            if opt.choices and v not in opt.choices:
                raise UserError(f"config key {k}: {v!r} is not one of {', '.join(map(str, opt.choices))}")
        cfg[k] = v
    cfg.update(args)
    cfg["all_config"] = known.all_config
    check_values(cfg, table, set(args), known.all_config)
    if cfg.get("paper_compat"):
        for k, v in PAPER_VALUES.items():
            if k in args and args[k] != v:
                log.warning("--paper_compat with --%s %s: that departs from the paper's %s", k, args[k], v)
            elif k in table:
                cfg[k] = v
    return cfg


def save_config(cfg: dict, path: Path) -> None:
    from ld3.io import atomic_write_text

    clean = {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, bool, type(None), list))}
    atomic_write_text(path, yaml.safe_dump(clean, sort_keys=True))


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> logging.Handler | None:
    """Log to stderr (once) and, if given, to ``log_file``; returns the file handler (to remove later)."""
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
    if log_file is None:
        return None
    fh = logging.FileHandler(log_file)
    fh.setFormatter(fmt)
    root.addHandler(fh)
    return fh


def os_error_message(e: OSError) -> tuple[str, int]:
    """One line for a file-system fault, and the exit status: 2 for a path the user can change, 1 for the
    environment (a full disk)."""
    import errno

    path = e.filename or "a file"
    what = e.strerror or type(e).__name__
    fix = "choose another folder (--data_dir, --log_path, --out_dir) or fix its permissions"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {path}: {what} (disk full); free space or choose a folder on another disk", 1
    if isinstance(e, NotADirectoryError) or e.errno == errno.ENOTDIR:
        return f"{path}: a file stands where a folder is needed; {fix}", 2
    if isinstance(e, FileExistsError):
        return f"{path} already exists and is not a folder; {fix}", 2
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {path}: {what}; {fix}", 2
    if isinstance(e, FileNotFoundError):
        return f"{path}: {what}; check the path", 2
    return f"{path}: {what}", 1


def run_cli(fn, argv: list[str] | None = None) -> int:
    """Run ``fn(argv)``; a ``UserError`` becomes one line on stderr and exit status 2, a file-system
    fault one line and 2 (a path to change) or 1 (a full disk)."""
    try:
        fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        msg, code = os_error_message(e)
        print(f"error: {msg}", file=sys.stderr)
        return code
    except PeerFailed as e:
        if not e.quiet:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
