"""Sample, evaluate, compare and export discretizations (learned or baseline).

Sample N images from fresh noise (``--sampling_seed``, drawn apart from the teacher data's noise) with a
learned run (``--load_from RUN/best_v2.pt``) or a baseline ``--skip_type``; write ``samples.npz``
(``arr_0``: N x H x W x C uint8), ``grid.png``, ``metrics.json`` (distance to the teacher, FID,
digit metrics) and, with ``--save_png``, ``images/{index:06d}.png`` into ``--out_dir``:

    python3 sample.py --all_config configs/digits_gmm.yml --load_from logs/digits_gmm/RUN/best_v2.pt \
        --num_samples 1000 --out_dir samples/ld3_nfe4

Compare every baseline and learned runs over NFEs (table as CSV + Markdown, plot):

    python3 sample.py --all_config configs/digits_gmm.yml --compare --nfes 3,4,6 \
        --runs logs/digits_gmm/RUN_A,logs/digits_gmm/RUN_B --metric teacher --out_dir samples/compare_digits

Export a learned run for diffusers / k-diffusion (t, t', lambda, sigmas, timesteps):

    python3 sample.py --all_config configs/digits_gmm.yml --export RUN/best_v2.pt --out ld3_nfe4.json
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ld3 import distributed
from ld3.config import (Opt, UserError, _int, _none_or, parse_config, run_cli, save_config,
                        setup_logging, str2bool)
from ld3.io import atomic_write_text
from ld3.runtime import (baseline_times, check_positive, check_solver_options,
                         setup_device_and_model)
from ld3.student import Rollout, SolverSpec

log = logging.getLogger("ld3")

EXTRA: dict[str, Opt] = {
    "num_samples": Opt(_int, 100, "sample.py: number of samples (sample mode) or of fresh noises per cell "
                       "(--compare)", lo=1),
    "out_dir": Opt(_none_or(str), None, "sample.py: output folder (default samples/<config>/<discretization>_"
                   "<solver>_NFE<n>_seed<s>, or samples/<config>/compare_<solver>_<metric> with --compare)"),
    "metrics": Opt(str, "auto", "sample.py: comma list of teacher, fid, digits, or none; auto = teacher, "
                   "plus digits for 8x8 digits models, plus fid when --ref_path exists"),
    "teacher_distances": Opt(str, "L2,L1,LPIPS", "sample.py: distances to the teacher (by default LPIPS only when its VGG "
                             "weights are in torch's hub cache; named here, it downloads them)"),
    "teacher_samples": Opt(_none_or(_int), None, "sample.py: distance to the teacher on the first K samples "
                           "(default: all)", lo=0),
    "inception_weights": Opt(_none_or(str), None, "FID: Inception weights file (default: torch hub cache, "
                             "weights-inception-2015-12-05-6726825d.pth)"),
    "grid_size": Opt(_int, 64, "sample.py: samples shown in grid.png", lo=1),
    "compare": Opt(str2bool, False, "sample.py: comparison table of baselines and learned runs over --nfes"),
    "runs": Opt(_none_or(str), None, "--compare: comma list of learned runs ([label=]run folder or "
                "best_v2.pt)"),
    "nfes": Opt(_none_or(str), None, "--compare: comma list of NFEs (default: --steps and the runs' NFEs)"),
    "metric": Opt(str, "teacher", "--compare: teacher (distance, --loss_type), fid or digit_fd",
                  ("teacher", "fid", "digit_fd")),
    "export": Opt(_none_or(str), None, "sample.py: export this learned run (folder or best_v2.pt) to JSON"),
    "out": Opt(_none_or(str), None, "--export: JSON file to write (default: export.json beside the "
               "checkpoint)"),
}


def _stem(cfg: dict) -> str:
    return Path(cfg["all_config"]).stem if cfg.get("all_config") else str(cfg["model"])


def _command(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "python3 sample.py " + " ".join(shlex.quote(a) for a in args)


# --------------------------------------------------------------------------- export
def run_export(cfg: dict) -> Path:
    from ld3.export import export_run, read_run, schedule_from_config, write_json

    schedule = schedule_from_config(cfg)
    run = read_run(cfg["export"], schedule, cfg)
    out = Path(cfg["out"]) if cfg.get("out") else run.path.parent / "export.json"
    d = export_run(run, schedule, model=str(cfg.get("model")))
    write_json(d, out)
    log.info("%s -> %s (%s, %d steps, %d NFE%s)", run.path, out, run.solver, run.steps, run.nfe,
             "; t' != t, see note" if d["decoupled"] else "")
    print(out)
    return out


# --------------------------------------------------------------------------- compare
def run_compare(cfg: dict, argv: list[str] | None) -> Path:
    from ld3.compare import compare, parse_nfes, to_markdown, write_outputs
    from ld3.export import read_run

    check_positive(cfg, "num_samples", "sampling_batch_size")
    check_solver_options(cfg)
    device, model = setup_device_and_model(cfg)
    specs = [s.strip() for s in str(cfg.get("runs") or "").split(",") if s.strip()]
    runs = [read_run(s, model.schedule, cfg) for s in specs]
    nfes = parse_nfes(cfg.get("nfes"))
    if not nfes and not runs:
        nfes = [int(cfg["steps"])]
    default = Path("samples") / _stem(cfg) / f"compare_{cfg['solver_name']}_{cfg['metric']}"
    out_dir = Path(cfg["out_dir"] or default)
    tab = compare(cfg, model, device, runs, nfes, cfg["metric"], int(cfg["num_samples"]),
                  int(cfg["sampling_batch_size"]))
    save_config(cfg, out_dir / "compare_config.yml")
    paths = write_outputs(tab, out_dir, _command(argv))
    print(to_markdown(tab))
    log.info("table: %s, %s; plot: %s", paths["md"], paths["csv"], paths["png"])
    return out_dir


# --------------------------------------------------------------------------- sample
def _metric_set(cfg: dict, model) -> set[str]:
    from ld3.fid import is_digits

    raw = {s.strip() for s in str(cfg["metrics"]).split(",") if s.strip()}
    bad = raw - {"auto", "none", "teacher", "fid", "digits"}
    if bad:
        raise UserError(f"--metrics: unknown {', '.join(sorted(bad))}; choose from teacher, fid, digits, "
                        "none, auto")
    if "none" in raw:
        return set()
    if "auto" in raw:
        raw.discard("auto")
        raw.add("teacher")
        if is_digits(model):
            raw.add("digits")
        elif cfg.get("ref_path"):
            if Path(cfg["ref_path"]).is_file():
                raw.add("fid")
            else:
                log.warning("FID skipped: --ref_path %s not found (pass --metrics fid to make that an error)",
                            cfg["ref_path"])
    return raw


def _distances(cfg: dict, device: torch.device) -> dict:
    from ld3.losses import _vgg_weights_file, make_distance

    out = {}
    default = str(cfg["teacher_distances"]) == EXTRA["teacher_distances"].default
    for name in [s.strip() for s in str(cfg["teacher_distances"]).split(",") if s.strip()]:
        if name not in ("L2", "L1", "LPIPS"):
            raise UserError(f"--teacher_distances: unknown {name!r}; choose from L2, L1, LPIPS")
        if name == "LPIPS" and default and not _vgg_weights_file().is_file():
            log.info("LPIPS skipped: no VGG16 weights at %s (put them there, or ask for LPIPS with "
                     "--teacher_distances, which downloads them)", _vgg_weights_file())
            continue
        try:
            out[name] = make_distance(name, device, int(cfg.get("lpips_size") or 224))
        except UserError as e:
            if name != "LPIPS":
                raise
            log.warning("LPIPS skipped: %s", e)
    return out


def _teacher_files(cfg: dict, model, n: int):
    """(z, c, uc, images) of the first ``n`` files of the teacher folder ``--data_dir``, or None if it holds none."""
    from ld3.data import list_sample_files, load_samples

    folder = Path(cfg["data_dir"])
    try:
        count = len(list_sample_files(folder))
    except UserError:
        return None
    if count < n:
        log.warning("%s holds %d teacher samples: measuring on %d, not %d", folder, count, count, n)
        n = count
    img_shape = tuple(model.info.get("img_shape", model.latent_shape))
    data = load_samples(folder, n, model.latent_shape, img_shape)
    return data.latent, data.c, data.uc, data.img


def _times(cfg: dict, model, steps: int):
    """(t, t', label, steps) of ``--load_from``'s learned run, or of the baseline ``--skip_type``."""
    solver = cfg["solver_name"]
    if not cfg.get("load_from"):
        if cfg.get("skip_type") is None:
            raise UserError("give --load_from RUN/best_v2.pt or a baseline --skip_type")
        return baseline_times(cfg, model, cfg["skip_type"], steps, int(cfg["steps"])), None, cfg["skip_type"], steps
    from ld3.export import read_run

    run = read_run(cfg["load_from"], model.schedule, cfg)
    if run.solver != solver:
        log.warning("%s was learned for %s; sampling with %s as asked", run.path, run.solver, solver)
    elif run.order is not None and cfg.get("order") is not None and int(run.order) != int(cfg["order"]):
        log.warning("%s was learned with order %s; sampling with order %s as asked", run.path, run.order,
                    cfg["order"])
    return run.t, run.tp, "ld3", run.t.numel() - 1


@dataclass
class Measures:
    """What the asked metrics need, loaded before sampling (a missing file stops at once): the FID and
    digit judges, the teacher distances, and the teacher rollout when there are no teacher files. Each
    batch adds to sums and feature moments (``add``); under torchrun they are summed over ranks
    (``reduce``) and the metrics computed from them, as one process computes them."""

    fid: Any = None
    fid_moments: Any = None
    judge: Any = None
    tally: Any = None  # the digit judge's counts and moments
    dists: dict = field(default_factory=dict)
    k_teacher: int = 0  # distances on the first k samples
    teacher: Any = None  # (rollout, grid) of the teacher on fresh noise
    sums: dict = field(default_factory=dict)  # summed distances, by name

    @classmethod
    def load(cls, cfg: dict, model, device: torch.device, wanted: set[str], n: int, seed: int,
             have_files: bool) -> "Measures":
        from ld3.evaluate import teacher_times

        m = cls()
        if "fid" in wanted:
            from ld3.fid import FID

            m.fid = FID(cfg.get("ref_path"), device, cfg.get("inception_weights"))
            m.fid_moments = m.fid.moments()
        if "digits" in wanted:
            from ld3.fid import DigitsJudge

            m.judge = DigitsJudge(seed=seed)
            m.tally = m.judge.tally(n)
        if "teacher" in wanted:
            m.dists = _distances(cfg, device)
            m.k_teacher = n if cfg.get("teacher_samples") is None else max(0, min(n, int(cfg["teacher_samples"])))
            if not have_files:
                tspec, t_teacher = teacher_times(cfg, model)
                roll = Rollout(model, tspec)
                m.teacher = (roll, roll.grid(t_teacher.to(device), device=device))
        m.sums = {k: 0.0 for k in m.dists}
        return m

    def add(self, batch, files, device: torch.device, u8) -> None:
        """A sampled batch (``u8``: its images as saved, N x H x W x C uint8): its FID features and digit
        scores (of the saved images), and its distances to the teacher's images (files, or a teacher rollout)."""
        start, img = batch.indices[0], batch.images
        if self.fid is not None:
            self.fid.add(self.fid_moments, u8)
        if self.judge is not None:
            self.judge.add(self.tally, start, _from_uint8(u8))
        kt = min(len(batch.indices), self.k_teacher - start)
        if not self.dists or kt <= 0:
            return
        if files is not None:
            ti = files[3][start:start + kt].to(device)
        else:
            roll, grid = self.teacher
            with torch.no_grad():
                ti = roll(batch.z[:kt].to(device), grid, None if batch.c is None else batch.c[:kt],
                          None if batch.uc is None else batch.uc[:kt])
        for name, d in self.dists.items():
            self.sums[name] += float(d(img[:kt].float(), ti.float()).sum())

    def reduce(self, place: distributed.Place) -> None:
        """Sum every rank's distances, FID moments and digit tally (a no-op in one process)."""
        self.sums = dict(zip(self.sums, place.sum(list(self.sums.values()))))
        if self.fid_moments is not None:
            self.fid_moments.reduce(place)
        if self.tally is not None:
            self.tally.reduce(place)


def _from_uint8(arr) -> torch.Tensor:
    """N x H x W x C uint8 -> N x C x H x W float in [-1, 1] (what the saved images hold)."""
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def run_sample(cfg: dict, argv: list[str] | None, place: "distributed.Place | None" = None) -> Path:
    from ld3.data import save_pngs, to_uint8
    from ld3.evaluate import fresh_noise, sampling_seed
    from ld3.samplers.solvers import nfe_of
    from ld3.sampling import chunked, sample_batches

    check_positive(cfg, "num_samples", "sampling_batch_size")
    steps = check_solver_options(cfg)
    device, model = setup_device_and_model(cfg)
    t, tp, label, steps = _times(cfg, model, steps)
    nfe = nfe_of(cfg["solver_name"], steps)
    seed = sampling_seed(cfg)
    n, bs = int(cfg["num_samples"]), int(cfg["sampling_batch_size"])
    wanted = _metric_set(cfg, model)

    # the noise: a teacher folder's latents (then its images are the teacher's), or fresh noise
    files = _teacher_files(cfg, model, n) if cfg.get("data_dir") and "teacher" in wanted else None
    if files is not None:
        n = files[0].shape[0]
    noise_label = Path(cfg["data_dir"]).name if files is not None else f"seed{seed}"
    out_dir = Path(cfg["out_dir"] or Path("samples") / _stem(cfg) /
                   f"{label}_{cfg['solver_name']}_NFE{nfe}_{noise_label}")
    measures = Measures.load(cfg, model, device, wanted, n, seed, files is not None)

    def draw(idx: list[int]):
        if files is None:
            return fresh_noise(cfg, model, len(idx), device, idx[0])
        sl = slice(idx[0], idx[-1] + 1)
        return files[0][sl], None if files[1] is None else files[1][sl], None if files[2] is None else files[2][sl]

    roll = Rollout(model, SolverSpec.from_cfg(cfg))
    grid = roll.grid(t.to(device), None if tp is None else tp.to(device), device=device)
    place = place or distributed.Place()
    batches = chunked(range(n), bs)
    owner = {c[0]: k for k, c in enumerate(batches)}
    chunks = []
    for b in sample_batches(roll, grid, batches, draw, device, desc=f"{label} NFE {nfe}" if place.main else None,
                            skip=lambda idx: not place.owns(owner[idx[0]])):
        u8 = to_uint8(b.images)
        chunks.append((b.indices[0], u8))
        if cfg.get("save_png"):
            save_pngs(out_dir / "images", b.indices, b.images)
        measures.add(b, files, device, u8)
    if place.active:  # metrics from statistics summed over ranks; the images, in sample order, to rank 0
        measures.reduce(place)
        gathered = place.gather_to_main(chunks)
        if not place.main:
            return out_dir
        chunks = sorted((c for part in gathered for c in part), key=lambda c: c[0])
    import numpy as np

    arr = np.concatenate([a for _, a in chunks])
    report = {"num_samples": n, "noise": "teacher files" if files is not None else "fresh",
              "sampling_seed": None if files is not None else seed, "solver": cfg["solver_name"],
              "order": cfg.get("order"), "nfe": nfe, "steps": steps, "discretization": label,
              "load_from": cfg.get("load_from"), "t": t.tolist(), "t_prime": (tp if tp is not None else t).tolist()}
    _write_sample(cfg, argv, out_dir, arr, report, measures, files is not None)
    return out_dir


def _write_sample(cfg: dict, argv, out_dir: Path, arr, report: dict, measures: Measures, from_files: bool) -> None:
    """samples.npz, grid.png, metrics.json (the report with every metric asked for), sample_config.yml."""
    from ld3.evaluate import save_grid_png, save_npz, teacher_config

    save_npz(out_dir / "samples.npz", arr)
    shown = _from_uint8(arr[:max(1, int(cfg["grid_size"]))])
    ncol = max(1, math.ceil(math.sqrt(len(shown))))
    what = f"LD3 run {cfg['load_from']}" if cfg.get("load_from") else f"baseline {report['discretization']}"
    save_grid_png(out_dir / "grid.png", shown, ncol, title=(
        f"{what}\n{report['solver']} NFE {report['nfe']}, {report['noise']} noise\n"
        f"samples 0-{len(shown) - 1} of {len(arr)}, row by row, {ncol} per row"))
    if measures.dists and measures.k_teacher > 0:
        if from_files:
            report["teacher"] = {"files": str(cfg["data_dir"]), "samples": measures.k_teacher}
        else:
            tcfg = teacher_config(cfg)
            report["teacher"] = {"solver": tcfg["solver_name"], "nfe": int(tcfg["steps"]),
                                 "skip_type": tcfg["skip_type"], "samples": measures.k_teacher}
        report["teacher"].update({k: v / measures.k_teacher for k, v in measures.sums.items()})
    if measures.fid is not None:
        report["fid"] = measures.fid.value(measures.fid_moments)
        report["fid_ref"] = str(cfg["ref_path"])
        if len(arr) < 50000:
            log.warning("FID from %d samples is biased upwards; papers use 50000", len(arr))
    if measures.judge is not None:
        report["digits"] = measures.judge.value(measures.tally)
    atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=1) + "\n")
    save_config({**cfg, "command": _command(argv)}, out_dir / "sample_config.yml")
    _print_report(report, out_dir)


def _print_report(r: dict, out_dir: Path) -> None:
    lines = [f"{r['num_samples']} samples, {r['discretization']}, {r['solver']} NFE {r['nfe']} -> {out_dir}"]
    if "teacher" in r:
        te = r["teacher"]
        ds = ", ".join(f"{k} {te[k]:.5g}" for k in ("L2", "L1", "LPIPS") if k in te)
        which = f"the files of {te['files']}" if "files" in te else f"{te['solver']} {te['nfe']} NFE"
        lines.append(f"  distance to the teacher ({which}, {te['samples']} samples): {ds}")
    if "fid" in r:
        lines.append(f"  FID {r['fid']:.4g} (against {r['fid_ref']})")
    if "digits" in r:
        d = r["digits"]
        lines.append(f"  digits: Frechet {d['frechet']:.4g} ({d['n']} samples) | floor "
                     f"{d['frechet_floor']:.4g} (held-out vs train, {d['n_floor']}) | samples at that count "
                     f"{d['frechet_matched']:.4g} | confident {100 * d['confident_share']:.1f}%")
        hist = d["class_histogram"]
        lines.append("  class histogram: " + " ".join(f"{i}:{h:.2f}" for i, h in enumerate(hist)))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> Path:
    setup_logging()
    cfg = parse_config(argv, description=__doc__.split("\n")[0], script="sample", extra=EXTRA)
    modes = [k for k in ("export", "compare") if cfg.get(k)]
    if len(modes) > 1:
        raise UserError("give either --export or --compare, not both")
    if cfg.get("export"):
        return run_export(cfg)
    if cfg.get("compare"):
        return run_compare(cfg, argv)
    place = distributed.init(cfg)  # under torchrun: this rank's share of the batches
    try:
        return run_sample(cfg, argv, place)
    finally:
        place.close()


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
