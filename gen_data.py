#!/usr/bin/env python3
"""Teacher data: turn noise into images with a many-step solver and save one file per sample.

    python3 gen_data.py --all_config configs/digits.yml --total_samples 100 --sampling_batch_size 10 \
        --steps 20 --solver_name uni_pc --skip_type edm --save_pt --save_png --data_dir train_data/digits

Files go to ``{data_dir}/{solver_name}_NFE{steps}_{skip_type}_seed{seed}/``. Noise depends on
(seed, sample index) only; a rerun on the same folder continues where it stopped.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ld3.config import UserError, parse_config, run_cli, save_config, setup_logging  # noqa: E402
from ld3.io import remove_stale_temporaries  # noqa: E402
from ld3.data import noise_for_indices, sample_path, save_png, save_sample  # noqa: E402
from ld3.runtime import (baseline_times, check_positive, check_solver_options, data_folder_name,  # noqa: E402
                         load_times, setup_device_and_model)
from ld3.student import Rollout, SolverSpec  # noqa: E402

log = logging.getLogger("ld3")


def main(argv: list[str] | None = None) -> Path:
    setup_logging()
    cfg = parse_config(argv, description=__doc__.split("\n")[0])
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
        label = "ld3"
    else:
        t = baseline_times(cfg, model, cfg["skip_type"], steps, nfe)
        tp, label = None, cfg["skip_type"]
    out = Path(cfg["data_dir"]) / data_folder_name(cfg, label)
    if not (cfg["save_pt"] or cfg["save_png"]):
        log.warning("neither --save_pt nor --save_png given: samples are computed but not saved")
    out.mkdir(parents=True, exist_ok=True)
    if remove_stale_temporaries(out):
        log.info("removed temporary files of an interrupted run in %s", out)
    save_config({**cfg, "teacher_steps_S": steps}, out / "gen_config.yml")

    n, bs, seed = int(cfg["total_samples"]), int(cfg["sampling_batch_size"]), int(cfg["seed"])

    def done(i: int) -> bool:
        ok = True
        if cfg["save_pt"]:
            ok &= sample_path(out, i).is_file()
        if cfg["save_png"]:
            ok &= (out / f"{i:06d}.png").is_file()
        return ok and bool(cfg["save_pt"] or cfg["save_png"])

    todo = [i for i in range(n) if not done(i)]
    if len(todo) < n:
        log.info("%d of %d samples already in %s; generating the other %d", n - len(todo), n, out, len(todo))
    rollout = Rollout(model, SolverSpec.from_cfg(cfg), low_gpu=False)
    with torch.no_grad(), tqdm(total=len(todo), desc="teacher", unit="img", disable=None) as bar:
        for b in range(0, len(todo), bs):
            idx = todo[b:b + bs]
            z = noise_for_indices(seed, idx, model.latent_shape).to(device)
            c, uc = model.conditions(idx, seed, device)
            img = rollout(z, t.to(device), None if tp is None else tp.to(device), c, uc).clamp(-1, 1)
            for j, i in enumerate(idx):
                if cfg["save_pt"]:
                    save_sample(out, i, z[j], img[j], None if c is None else c[j], None if uc is None else uc[j])
                if cfg["save_png"]:
                    save_png(out, i, img[j])
            bar.update(len(idx))
    log.info("%d samples in %s (%d network calls per sample)", n, out, rollout.fn.calls // max(1, -(-len(todo) // bs)))
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main))
