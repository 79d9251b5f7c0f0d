"""Learn a discretization (LD3): the few times at which the student solver should call the network.

    python3 main.py --all_config configs/digits.yml \
        --data_dir train_data/digits/uni_pc_NFE20_edm_seed0 --num_train 50 --num_valid 50 \
        --main_train_batch_size 1 --main_valid_batch_size 10 \
        --training_rounds_v1 2 --training_rounds_v2 5 --log_path logs/digits

Writes ``{log_path}/{solver}-N{steps}-b{bound}-{loss}-lr2{lr2}rv1{v1}-rv2{v2}-seed{seed}/`` with
config.yml, log.txt, best_v1.pt, best_v2.pt, history.json, schedule.png and curves.png.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ld3 import distributed
from ld3.config import UserError, parse_config, run_cli, save_config, setup_logging
from ld3.data import SampleSet, load_samples
from ld3.discretization import LearnedDiscretization, checkpoint_dict
from ld3.full_batch import FullBatchConfig, FullBatchTrainer
from ld3.figures import FigureHelper
from ld3.identity import check_run_folder, run_identity, write_identity
from ld3.io import (FolderLock, atomic_torch_save, atomic_write_text, remove_stale_temporaries,
                    safe_load)
from ld3.losses import check_loss, make_distance
from ld3.runtime import (check_positive, check_solver_options, derived_hparams, gits_prior,
                         run_name, setup_device_and_model, time_mode)
from ld3.models.base import Model
from ld3.student import Rollout, SolverSpec
from ld3.trainer import LD3Trainer, NumericalError, save_history, train_config_from

log = logging.getLogger("ld3")


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process (MB), and of the accelerator when on CUDA."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def is_trained(run_dir: Path) -> bool:
    """As the paper's code: the last non-empty line of log.txt reports the training time."""
    log_file = run_dir / "log.txt"
    if not log_file.is_file() or not (run_dir / "best_v2.pt").is_file():
        return False
    lines = [x for x in log_file.read_text(errors="replace").splitlines() if x.strip()]
    return bool(lines) and "Training time" in lines[-1]


def main(argv: list[str] | None = None) -> Path:
    setup_logging()
    cfg = parse_config(argv, description=__doc__.split("\n")[0], script="main")
    place = distributed.init(cfg)  # under torchrun: data-parallel learning, rank 0 writes
    try:
        return _main(cfg, place)
    finally:
        place.close()


@dataclass(frozen=True)
class Job:
    """One learning job, resolved from the options: what ``_train`` needs, in one record."""

    cfg: dict
    model: Model
    device: torch.device
    data: SampleSet
    distance: Callable
    run_dir: Path
    steps: int  # intervals S of the discretization
    nfe: int
    bound: float
    shift_lr: float
    lr2: float
    n_train: int
    n_valid: int
    place: distributed.Place = distributed.Place()

    @property
    def state_file(self) -> Path:
        return self.run_dir / "last_state.pt"


def _main(cfg: dict, place: distributed.Place) -> Path:
    if cfg["order_rng"] == "global":  # the paper's set_seed_everything, before anything draws
        torch.manual_seed(int(cfg["seed"]))
    check_positive(cfg, "num_train", "num_valid", "main_train_batch_size", "main_valid_batch_size")
    steps = check_solver_options(cfg)
    nfe = int(cfg["steps"])
    check_loss(cfg["loss_type"])
    device, model = setup_device_and_model(cfg)
    bound, shift_lr, lr2 = derived_hparams(cfg, model.latent_shape, nfe)
    run_dir = Path(cfg["log_path"]) / run_name(cfg, bound, lr2)
    img_shape = tuple(model.info.get("img_shape", model.latent_shape))
    n_train, n_valid = int(cfg["num_train"]), int(cfg["num_valid"])
    data = load_samples(Path(cfg["data_dir"]), n_train + n_valid, model.latent_shape, img_shape)
    identity = run_identity(cfg, model, data.files)
    if place.main:  # rank 0 checks (and with --overwrite clears) the folder; the others then read it
        reuse = check_run_folder(run_dir, identity, bool(cfg.get("overwrite")))
    place.barrier()
    if not place.main:
        reuse = check_run_folder(run_dir, identity, False)
    if reuse and is_trained(run_dir):
        if cfg.get("resume"):
            log.info("%s is finished; --resume changes nothing", run_dir)
        else:
            log.info("%s already records a finished training with the same model, data and options: skipping "
                     "(--overwrite to train again)", run_dir)
        return run_dir
    distance = make_distance(cfg["loss_type"], device, int(cfg.get("lpips_size") or 32))
    job = Job(cfg, model, device, data, distance, run_dir, steps, nfe, bound, shift_lr, lr2, n_train, n_valid, place)
    if cfg.get("resume") and not job.state_file.is_file():
        raise UserError(f"--resume: no saved state in {run_dir}; run without --resume to start it")
    if reuse and not cfg.get("resume") and any(run_dir.glob("best_v*.pt")):
        log.warning("%s holds an unfinished run; starting again (use --resume to continue it)", run_dir)
    if not place.main:  # the other ranks learn alongside and write nothing
        return _train(job)
    with FolderLock(run_dir, "run folder"):  # one writer at a time
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)
        write_identity(run_dir, identity)
        handler = setup_logging(run_dir / "log.txt")
        try:
            return _train(job)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()


def learning_sets(data: SampleSet, n_train: int, n_valid: int, valid_use: str) -> tuple[SampleSet, SampleSet]:
    """(training set, validation set) of the first ``n_train + n_valid`` teacher samples. ``select`` (the
    paper's code): the first ``n_train`` to learn from, the next ``n_valid`` to choose the best checkpoint on.
    ``train`` (ours): all of them to learn from and to choose on (with 50 + 50 files the learned schedule is
    measured closer to the teacher on fresh noise; README, Departures)."""
    if valid_use == "train":
        both = data.subset(slice(0, n_train + n_valid))
        return both, both
    return data.subset(slice(0, n_train)), data.subset(slice(n_train, n_train + n_valid))


def fb_chunk(cfg: dict) -> int:
    """Samples per forward/backward pass of the full-batch gradient: --fb_chunk, else the training batch size
    (the memory a config was sized for: the paper's configs backpropagate through batches of 1-2)."""
    return int(cfg["fb_chunk"]) if cfg.get("fb_chunk") else int(cfg["main_train_batch_size"])


def _trainer(job: Job, rollout: Rollout) -> "LD3Trainer | FullBatchTrainer":
    """The discretization (fitted to the prior with --match_prior) and its trainer, resumed with --resume.
    The rounds trainer writes the best checkpoints with every improvement (rank 0), as the paper's code; the
    full-batch one, which improves at nearly every iteration, with its saved state (``_train``)."""
    cfg, model, run_dir = job.cfg, job.model, job.run_dir
    disc = LearnedDiscretization(model.schedule, job.steps, time_mode(cfg, model), float(cfg["win_rate"]),
                                 window=cfg["window"], arithmetic=cfg["arithmetic"]).to(job.device)
    if cfg.get("match_prior"):
        err = disc.fit_to(gits_prior(cfg, model, job.steps).to(job.device))
        log.info("params1 fitted to the prior schedule (max error %.3g in the learning variable)", err)

    def on_improve(tr: LD3Trainer) -> None:
        if not job.place.main:
            return
        ck = checkpoint_dict(tr.disc)
        if tr.phase == 1:
            atomic_torch_save(ck, run_dir / "best_v1.pt")
        atomic_torch_save(ck, run_dir / "best_v2.pt")

    train, valid = learning_sets(job.data, job.n_train, job.n_valid, cfg["valid_use"])
    if cfg["trainer"] == "full_batch":
        fb = FullBatchConfig(iters_v1=int(cfg["fb_iters_v1"]), iters_v2=int(cfg["fb_iters_v2"]),
                             lr_1=float(cfg["fb_lr_1"]), lr_2=float(cfg["fb_lr_2"]),
                             chunk=fb_chunk(cfg), valid_every=int(cfg["valid_every"]),
                             no_v1=bool(cfg.get("no_v1")), robust=float(cfg["fb_robust"]))
        trainer: LD3Trainer | FullBatchTrainer = FullBatchTrainer(
            disc, rollout, job.distance, train, valid, fb, job.device, count_calls=lambda: rollout.fn.calls,
            place=job.place)
        if cfg.get("resume"):
            trainer.load_state_dict(safe_load(job.state_file, "saved state"))
            log.info("resuming after iteration %d", trainer.state.it)
        return trainer
    rng = torch.default_generator if cfg["order_rng"] == "global" else None
    trainer = LD3Trainer(disc, rollout, job.distance, train, valid,
                         train_config_from(cfg, job.bound, job.shift_lr, job.lr2), job.device, rng=rng,
                         seed=int(cfg["seed"]), on_improve=on_improve, count_calls=lambda: rollout.fn.calls,
                         place=job.place)
    if cfg.get("resume"):
        trainer.load_state_dict(safe_load(job.state_file, "saved state"))
        log.info("resuming after round %d (step %d)", trainer.state.round, trainer.state.step)
    return trainer


def _train(job: Job) -> Path:
    cfg, model, run_dir, writes = job.cfg, job.model, job.run_dir, job.place.main
    if writes:
        save_config({**cfg, "bound": job.bound, "shift_lr": job.shift_lr, "lr_time_2_resolved": job.lr2,
                     "S": job.steps, "time_mode": time_mode(cfg, model), "processes": job.place.world},
                    run_dir / "config.yml")
    learned_from = job.n_train + job.n_valid if cfg["valid_use"] == "train" else job.n_train
    if cfg["trainer"] == "full_batch":
        log.info("run %s: %s, NFE %d (%d steps), full batch: %d + %d Adam iterations (rates %.4g, %.4g) on the exact "
                 "gradient of %d samples (robust scale %g), latents fixed", run_dir.name, cfg["solver_name"], job.nfe, job.steps,
                 0 if cfg.get("no_v1") else cfg["fb_iters_v1"], cfg["fb_iters_v2"], cfg["fb_lr_1"], cfg["fb_lr_2"],
                 learned_from, cfg["fb_robust"])
    else:
        log.info("run %s: %s, NFE %d (%d steps), rounds: bound %.8g, shift_lr %.8g, lr_time_2 %.8g, learning from %d "
                 "samples%s", run_dir.name, cfg["solver_name"], job.nfe, job.steps, job.bound, job.shift_lr, job.lr2,
                 learned_from, " (paper_compat)" if cfg.get("paper_compat") else "")
    t_start = time.perf_counter()
    rollout = Rollout(model, SolverSpec.from_cfg(cfg), low_gpu=bool(cfg["low_gpu"]), timed=True)
    trainer = _trainer(job, rollout)

    def save_state(tr) -> None:
        if writes:
            atomic_torch_save(tr.state_dict(), job.state_file)
            save_history(tr.state.history, run_dir / "history.json")
            if isinstance(tr, FullBatchTrainer):
                if tr.state.best_v1 is not None:
                    atomic_torch_save(tr.state.best_v1, run_dir / "best_v1.pt")
                atomic_torch_save(tr.best_checkpoint(), run_dir / "best_v2.pt")

    t_train = time.perf_counter()
    # Figures are drawn once, at the end (the paper's code redraws them at every new best), by a
    # helper that loads matplotlib while training runs; leaving the block waits for them.
    with FigureHelper(job.device) if cfg["visualize"] and writes else contextlib.nullcontext() as figures:
        try:
            result = trainer.run(save_state)
        except NumericalError as e:
            if writes:  # keep what was learned before the numbers broke
                save_history(trainer.state.history, run_dir / "history.json")
                if trainer.state.best is not None:
                    trainer.load_params(trainer.state.best)
                    atomic_torch_save(checkpoint_dict(trainer.disc), run_dir / "best_v2.pt")
            raise UserError(str(e)) from None
        with torch.no_grad():
            t, tp = trainer.disc()
        if not writes:
            return run_dir
        if trainer.state.best_v1 is not None:
            atomic_torch_save(trainer.state.best_v1, run_dir / "best_v1.pt")
        atomic_torch_save(checkpoint_dict(trainer.disc), run_dir / "best_v2.pt")
        save_history(result.history, run_dir / "history.json")
        if figures is not None:
            figures.draw("plot_schedule", model.schedule, t.cpu(), tp.cpu(), run_dir / "schedule.png",
                         f"{cfg['solver_name']} NFE {job.nfe}: learned vs baselines")
            figures.draw("plot_curves", result.history, run_dir / "curves.png")
    _write_result(job, result, rollout, trainer, t, tp, time.perf_counter() - t_train)
    if int(cfg.get("eval_fresh") or 0) > 0:
        from ld3.evaluate import compare_with_baselines

        compare_with_baselines(cfg, model, job.device, {"LD3": (t, tp)}, int(cfg["eval_fresh"]), job.distance,
                               out_dir=run_dir)
    log.info("Training time: %.1f s", time.perf_counter() - t_start)
    return run_dir


def _write_result(job: Job, result, rollout: Rollout, trainer, t, tp, wall: float) -> None:
    """result.json: timing (network, loss, overhead factor), memory, losses, steps, NFE and the times."""
    net, loss = rollout.fn.clock, trainer.distance.clock
    busy = net.total_s + loss.total_s
    timing = {"wall_train_s": wall, "network_forward_s": net.forward_s, "network_backward_s": net.backward_s,
              "loss_s": loss.total_s, "overhead_factor": wall / busy if busy > 0 else None}
    summary = {"timing": timing, "memory": peak_memory(job.device),
               "best_valid_loss": result.best_loss, "best_v1_valid_loss": result.best_v1_loss,
               "samples": {"valid_use": job.cfg["valid_use"], "learned_from": len(trainer.train),
                           "validated_on": len(trainer.valid)},
               "optimizer_steps": result.steps, "stopped_early": result.stopped_early,
               "nfe_per_sample": {k: v / len(trainer.train) if k != "validation" else v / len(trainer.valid)
                                  for k, v in result.nfe.items()},
               "t": t.tolist(), "t_prime": tp.tolist(),
               "lambda": job.model.schedule.lambda_(t.double().cpu()).tolist()}
    place = trainer.place
    if place.active:  # what the ranks exchanged: gradients, loss sums, moved latents
        summary["processes"] = {"world": place.world, "all_reduce_bytes": place.traffic["bytes"],
                                "all_reduce_calls": place.traffic["calls"],
                                "all_reduce_bytes_per_step": place.traffic["bytes"] / max(1, result.steps)}
        log.info("%d processes: %d bytes all-reduced in %d calls (%.0f bytes per optimizer step)", place.world,
                 place.traffic["bytes"], place.traffic["calls"], summary["processes"]["all_reduce_bytes_per_step"])
    atomic_write_text(job.run_dir / "result.json", json.dumps(summary, indent=1))
    log.info("training finished: best validation loss %.6g after %d steps; times %s", result.best_loss,
             result.steps, ", ".join(f"{v:.4g}" for v in t.tolist()))
    if busy > 0:
        log.info("time: %.1f s training, of which network %.1f s (forward %.1f, backward %.1f) and loss %.1f s; "
                 "overhead factor %.2f", wall, net.total_s, net.forward_s, net.backward_s, loss.total_s,
                 timing["overhead_factor"])
    else:  # the paper's arithmetic: no timing hooks (they would regroup gradient sums)
        log.info("time: %.1f s training (network not timed under --arithmetic paper)", wall)


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
