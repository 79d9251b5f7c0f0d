"""Teacher data: turn noise into images with a many-step solver and save one file per sample.

    python3 gen_data.py --all_config configs/digits.yml --total_samples 100 --sampling_batch_size 10 \
        --steps 20 --solver_name uni_pc --skip_type edm --save_pt --save_png --data_dir train_data/digits

Files go to ``{data_dir}/{solver_name}_NFE{steps}_{skip_type}_seed{seed}/``. Noise depends on
(seed, sample index) only; a rerun on the same folder continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import torch

from ld3 import distributed
from ld3.config import parse_config, run_cli, save_config, setup_logging
from ld3.io import FolderLock, atomic_write_text, background_executor, remove_stale_temporaries
from ld3.data import noise_for_indices, sample_path, save_pngs, save_sample
from ld3.runtime import (baseline_times, check_positive, check_solver_options, data_folder_name,
                         check_learned_run, gits_prior, load_times, setup_device_and_model)
from ld3.identity import check_data_folder, teacher_identity, write_identity
from ld3.sampling import chunked, sample_batches
from ld3.student import Rollout, SolverSpec

log = logging.getLogger("ld3")


def write_batch(out: Path, idx: list[int], z, img, c, uc, pt: bool, png: bool, png_mode: str) -> None:
    """Write one batch of samples (runs in the writer process or thread)."""
    if pt:
        for j, i in enumerate(idx):
            save_sample(out, i, z[j], img[j], None if c is None else c[j], None if uc is None else uc[j])
    if png:
        save_pngs(out, idx, img, png_mode)


def _warm_writer() -> None:
    """In a writer, before the first batch arrives: load the PNG encoder."""
    from PIL import Image  # noqa: F401


def noise_source(cfg: dict, model, device: torch.device):
    """``draw(indices) -> (z, c, uc)`` of the teacher data.

    ``noise: index`` (ours): each sample's noise from (seed, index) alone, whatever the batch size.
    ``noise: paper``: the paper's code, ``torch.manual_seed(seed)`` then one ``randn(batch, C, H, W)`` per
    batch, in order, on the device; call it for every batch, done or not, to stay in step.
    """
    seed = int(cfg["seed"])
    if cfg["noise"] == "paper":
        torch.manual_seed(seed)

        def draw(idx: list[int]):
            z = torch.randn((len(idx), *model.latent_shape), device=device).cpu()
            return (z, *model.conditions(idx, seed, device))
        return draw

    def draw_index(idx: list[int]):
        return (noise_for_indices(seed, idx, model.latent_shape), *model.conditions(idx, seed, device))
    return draw_index


def main(argv: list[str] | None = None) -> Path:
    setup_logging()
    cfg = parse_config(argv, description=__doc__.split("\n")[0], script="gen_data")
    place = distributed.init(cfg)  # under torchrun: this rank's share of the batches
    try:
        return _generate(cfg, place)
    finally:
        place.close()


def _generate(cfg: dict, place: distributed.Place) -> Path:
    check_positive(cfg, "total_samples", "sampling_batch_size")
    steps = check_solver_options(cfg)
    device, model = setup_device_and_model(cfg)
    nfe = int(cfg["steps"])
    if cfg.get("learn") and not cfg.get("load_from"):
        from ld3.runtime import derived_hparams, run_name

        bound, _, lr2 = derived_hparams(cfg, model.latent_shape, nfe)
        cfg["load_from"] = str(Path(cfg["log_path"]) / run_name(cfg, bound, lr2) / "best_v2.pt")
        log.info("--learn: sampling with %s", cfg["load_from"])
    if cfg.get("load_from"):
        t, tp = load_times(cfg["load_from"], model)
        steps = t.numel() - 1
        cfg["steps"] = check_learned_run(cfg, cfg["load_from"], steps)
        label = "ld3"
    elif cfg.get("gits_ts") or cfg.get("use_gits"):  # the paper's prior schedule, t' = t
        t, tp, label = gits_prior(cfg, model, steps), None, cfg.get("skip_type") or "gits"
    else:
        t = baseline_times(cfg, model, cfg["skip_type"], steps, nfe)
        tp, label = None, cfg["skip_type"]
    out = Path(cfg["data_dir"]) / data_folder_name(cfg, label)
    if not (cfg["save_pt"] or cfg["save_png"]):
        log.warning("neither --save_pt nor --save_png given: samples are computed but not saved")
    identity = teacher_identity(cfg, model)
    if place.main:  # one rank checks (and with --overwrite clears) the folder; the others wait for it
        check_data_folder(out, identity, bool(cfg.get("overwrite")))
        out.mkdir(parents=True, exist_ok=True)
        if remove_stale_temporaries(out):
            log.info("removed temporary files of an interrupted run in %s", out)
    place.barrier()
    n, bs = int(cfg["total_samples"]), int(cfg["sampling_batch_size"])

    def done(idx: list[int]) -> bool:
        ok = bool(cfg["save_pt"] or cfg["save_png"])
        for i in idx:
            if cfg["save_pt"]:
                ok &= sample_path(out, i).is_file()
            if cfg["save_png"]:
                ok &= (out / f"{i:06d}.png").is_file()
        return ok

    # every sample is computed in the batch an uninterrupted run computes it in: a resumed run writes
    # the same bytes
    chunks = chunked(range(n), bs)
    open_chunks = [c for c in chunks if not done(c)]
    todo = sum(len(c) for c in open_chunks)
    if todo == 0:
        log.info("all %d samples are already in %s (made by the same model and options): nothing to do", n, out)
        return out
    if todo < n:
        log.info("%d of %d samples already in %s; generating the other %d", n - todo, n, out, todo)
    if place.active:
        log.info("%d processes share the %d batches (round robin)", place.world, len(chunks))
    owner = {c[0]: k for k, c in enumerate(chunks)}

    def skip(idx: list[int]) -> bool:  # done, or another rank's batch
        return not place.owns(owner[idx[0]]) or done(idx)

    mine = [c for c in open_chunks if place.owns(owner[c[0]])]
    lock = FolderLock(out, "data folder") if place.main else contextlib.nullcontext()
    with lock:  # one writer at a time (under torchrun: one job, its rank 0 holds the lock)
        if place.main:
            save_config({**cfg, "teacher_steps_S": steps}, out / "gen_config.yml")
            write_identity(out, identity)
        rollout = Rollout(model, SolverSpec.from_cfg(cfg), timed=True)
        grid = rollout.grid(t, tp, device=device)  # the solver's coefficients: the same times for every batch
        png_mode = "paper" if cfg["arithmetic"] == "paper" else "round"
        t_start = time.perf_counter()
        # Files are written by a background writer while the next batch is computed (at most two
        # batches wait), so the time a user waits is the network's. (Two writers, each taking half a
        # batch, were measured slower: on 2 cores they slow the network down more than they save.)
        pending: list[Future] = []
        with background_executor(device, _warm_writer) as writer:
            for b in sample_batches(rollout, grid, chunks, noise_source(cfg, model, device), device, skip=skip,
                                    desc="teacher" if place.main else None):
                z, img, c, uc = (v.detach().cpu() if isinstance(v, torch.Tensor) else v
                                 for v in (b.z, b.images, b.c, b.uc))
                pending.append(writer.submit(write_batch, out, b.indices, z, img, c, uc, bool(cfg["save_pt"]),
                                             bool(cfg["save_png"]), png_mode))
                while len(pending) > 2 or (pending and pending[0].done()):
                    pending.pop(0).result()
            for f in pending:
                f.result()
        place.barrier()  # every rank's files are written
        wall = time.perf_counter() - t_start
        calls, net_s, batches = place.sum([rollout.fn.calls, rollout.fn.clock.forward_s, len(mine)])
        net_s /= place.world  # the ranks run side by side: the mean network time of one
        stats = {"images": todo, "wall_s": wall, "network_s": net_s, "processes": place.world,
                 "images_per_s": todo / wall if wall > 0 else None,
                 "network_bound_images_per_s": todo / net_s if net_s > 0 else None,
                 "share_of_bound": net_s / wall if wall > 0 else None,
                 "network_calls_per_sample": calls / batches if batches else 0}
        if place.main:
            atomic_write_text(out / "gen_stats.json", json.dumps(stats, indent=1))
        log.info("%d samples in %s: %.1f images/s (%.0f%% of the network-only bound), %d network calls per sample",
                 n, out, stats["images_per_s"] or 0, 100 * (stats["share_of_bound"] or 0),
                 stats["network_calls_per_sample"])
        return out


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
