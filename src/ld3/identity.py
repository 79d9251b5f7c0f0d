"""What produced a data folder or a run folder: recorded beside it, compared when it is reused.

The folder names stay the paper's (``uni_pc_NFE20_edm_seed0``, ``uni_pc-N10-b...-seed0``), and they
do not name the model, its checkpoint or most options. So each folder gets ``ld3_identity.json``:
the model (its checkpoint's sha256), the solver with every declared option, and every option that
changes the result. A rerun that would reuse the folder compares: a difference stops with one line
naming the option, its recorded and its new value, and the fix (another folder, or ``--overwrite``).
A finished run is skipped only when everything matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ld3.config import UserError
from ld3.io import atomic_write_text
from ld3.samplers.solvers import get_solver

log = logging.getLogger("ld3")

RECORD = "ld3_identity.json"

TEACHER_KEYS = ("solver_name", "steps", "order", "skip_type", "seed", "noise", "arithmetic", "gits_ts",
                "use_gits", "dataset", "flow_shift")
RUN_KEYS = ("solver_name", "steps", "order", "time_mode", "seed", "loss_type", "num_train", "num_valid",
            "main_train_batch_size", "main_valid_batch_size", "training_rounds_v1", "training_rounds_v2", "no_v1",
            "lr_time_1", "lr_time_2", "momentum_time_1", "weight_decay_time_1", "min_lr_time_1", "min_lr_time_2",
            "lr_time_decay", "patient", "lr2_patient", "shift_lr", "shift_lr_decay", "prior_bound", "fix_bound",
            "win_rate", "match_prior", "use_gits", "gits_ts", "dataset", "valid_every", "valid_use", "eval_on_one",
            "latent_step", "latent_check", "reload_latents", "window", "order_rng", "arithmetic", "trainer")


# Files at least this large (checkpoints) have their digests kept in a cache; smaller ones (teacher files,
# a few KB each) are hashed again, which is cheaper than reading the cache.
CACHE_MIN_BYTES = 8 << 20
CACHE_MAX_ENTRIES = 2000  # the oldest go first
_cache: dict[str, dict] = {}  # the cache file's entries, read once per process


def _cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ld3" / "sha256.json"


def _cached_digests() -> dict:
    where = str(_cache_file())
    if where not in _cache:
        try:
            entries = json.loads(Path(where).read_text())
        except (OSError, ValueError):
            entries = {}
        _cache[where] = entries if isinstance(entries, dict) else {}
    return _cache[where]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file (of every file, by relative name, for a folder); a large file's is cached by path, size
    and mtime."""
    path = Path(path).resolve()
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path)}\0{file_digest(f)}\n".encode())
        return h.hexdigest()
    st = path.stat()
    if st.st_size < CACHE_MIN_BYTES:
        return _sha256(path)
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache = _cached_digests()
    if key in cache:
        return cache[key]
    digest = _sha256(path)
    try:  # entries other processes wrote since this one read the file are kept
        cache.update({k: v for k, v in json.loads(_cache_file().read_text()).items() if k not in cache})
    except (OSError, ValueError, AttributeError):
        pass
    cache.pop(key, None)
    cache[key] = digest  # the newest last
    for old in list(cache)[:max(0, len(cache) - CACHE_MAX_ENTRIES)]:
        del cache[old]
    try:
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_cache_file(), json.dumps(cache))
    except OSError:
        pass  # read-only home: hash again next time
    return digest


def _tensor_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, v in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_identity(cfg: dict, model) -> dict:
    """The model: its family options, and its checkpoint's sha256 (or, for embedded and analytic models,
    that of its tensors)."""
    from ld3.models.registry import identity_keys

    out: dict[str, Any] = {k: cfg.get(k) for k in identity_keys() if cfg.get(k) is not None}
    out["model_name"] = model.name
    ckp = cfg.get("ckp_path")
    if ckp and Path(ckp).exists():
        out["checkpoint_sha256"] = file_digest(ckp)
    elif model.net is not None:
        out["weights_sha256"] = _tensor_digest(model.net)
    if cfg.get("prompt_path") and Path(cfg["prompt_path"]).is_file():
        out["prompts_sha256"] = file_digest(cfg["prompt_path"])
    return out


def solver_identity(cfg: dict) -> dict:
    """The solver's name, order and every option it declares, resolved (the option's default if unset)."""
    info = get_solver(cfg["solver_name"])
    out = {"order": info.default_order if cfg.get("order") is None else int(cfg["order"])}
    for o in info.all_options:
        v = cfg.get(o.cfg_key)
        out[o.cfg_key] = o.default if v is None else v
    return out


def teacher_identity(cfg: dict, model) -> dict:
    out = {k: cfg.get(k) for k in TEACHER_KEYS}
    out.update(solver_identity(cfg), model=model_identity(cfg, model))
    if cfg.get("noise") == "paper":  # then the noise depends on the batch size
        out["sampling_batch_size"] = cfg.get("sampling_batch_size")
    if cfg.get("load_from"):
        p = Path(cfg["load_from"])
        out["load_from_sha256"] = file_digest(p / "best_v2.pt" if p.is_dir() else p)
    return out


def data_fingerprint(files: list[Path]) -> str:
    """sha256 over the teacher files a run reads (their names and contents)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


FULL_BATCH_KEYS = ("fb_iters_v1", "fb_iters_v2", "fb_lr_1", "fb_lr_2", "fb_chunk", "fb_robust")


def run_identity(cfg: dict, model, data_files: list[Path]) -> dict:
    out = {k: cfg.get(k) for k in RUN_KEYS}
    if cfg.get("trainer") == "full_batch":
        out.update({k: cfg.get(k) for k in FULL_BATCH_KEYS})
    out.update(solver_identity(cfg), model=model_identity(cfg, model), data=data_fingerprint(data_files))
    if cfg.get("loss_type") == "LPIPS":
        out["lpips_size"] = cfg.get("lpips_size")
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# Options added after records were first written, with the value that computes what was computed before
# them: a record without the key was made with that value.
ADDED_LATER: dict[str, Any] = {"final_denoise": False, "flow_shift": "3.0", "valid_use": "select", "trainer": "rounds",
                                 "fb_robust": 0.0}


def differences(recorded: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(option, recorded value, current value) for every option that differs."""
    a, b = _flat(json.loads(json.dumps(recorded))), _flat(json.loads(json.dumps(current)))
    for k, v in ADDED_LATER.items():
        if k in b and k not in a:
            a[k] = v
    # options both records name come first: they say what differs (an option only one names follows from them)
    keys = sorted(set(a) | set(b), key=lambda k: (not (k in a and k in b), k))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def read_identity(folder: Path) -> dict | None:
    p = Path(folder) / RECORD
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        raise UserError(f"{p} is not readable JSON; delete it, or pass --overwrite") from None


def write_identity(folder: Path, identity: dict) -> None:
    atomic_write_text(Path(folder) / RECORD, json.dumps(identity, indent=1, sort_keys=True) + "\n")


def mismatch_message(what: str, folder: Path, diff: list[tuple[str, Any, Any]], fix: str) -> str:
    k, old, new = diff[0]
    more = f" (and {len(diff) - 1} more: {', '.join(d[0] for d in diff[1:4])}{', ...' if len(diff) > 4 else ''})" \
        if len(diff) > 1 else ""
    return f"{what} {folder} was made with {k}={old!r}, now {k}={new!r}{more}; {fix}, or pass --overwrite"


DATA_FILES = ("latent_*.pt", "[0-9]*.png", "gen_stats.json", "gen_config.yml", RECORD)
RUN_FILES = ("best_v1.pt", "best_v2.pt", "last_state.pt", "log.txt", "config.yml", "history.json", "result.json",
             "schedule.png", "curves.png", "comparison.md", "samples_grid.png", RECORD)


def _clear(folder: Path, patterns: tuple[str, ...]) -> int:
    n = 0
    for pat in patterns:
        for p in Path(folder).glob(pat):
            p.unlink()
            n += 1
    return n


def check_data_folder(out: Path, identity: dict, overwrite: bool) -> None:
    """Stop (one line) if ``out`` holds samples another model or other options made; with ``overwrite``
    remove them instead."""
    out = Path(out)
    if not out.is_dir():
        return
    has_samples = any(out.glob("latent_*.pt")) or any(out.glob("[0-9]*.png"))
    recorded = read_identity(out)
    if recorded is None and not has_samples:
        return
    diff = differences(recorded, identity) if recorded is not None else None
    if diff == []:
        return
    if overwrite:
        log.warning("--overwrite: removing %d files of %s", _clear(out, DATA_FILES), out)
        return
    if diff is None:
        raise UserError(f"data folder {out} holds samples with no record of what made them (the paper's code or "
                        "an older version wrote them); use another --data_dir, or pass --overwrite to regenerate")
    raise UserError(mismatch_message("data folder", out, diff, "use another --data_dir"))


def check_run_folder(run_dir: Path, identity: dict, overwrite: bool) -> bool:
    """Whether ``run_dir`` may be used for this run (False: nothing there yet, or it was cleared); stops
    (one line) when another model, other data or other options made what is there."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    has_run = any((run_dir / f).is_file() for f in ("best_v2.pt", "log.txt", "last_state.pt"))
    recorded = read_identity(run_dir)
    if recorded is None and not has_run:
        return False
    diff = differences(recorded, identity) if recorded is not None else None
    if diff == []:
        return True
    if overwrite:
        log.warning("--overwrite: removing %d files of %s", _clear(run_dir, RUN_FILES), run_dir)
        return False
    if diff is None:
        raise UserError(f"run folder {run_dir} holds a run with no record of its model, data and options (the "
                        "paper's code or an older version made it); use another --log_path, or pass --overwrite")
    raise UserError(mismatch_message("run folder", run_dir, diff, "use another --log_path"))


__all__ = ["RECORD", "file_digest", "model_identity", "teacher_identity", "run_identity", "differences",
           "check_data_folder", "check_run_folder", "write_identity", "read_identity"]
