"""The LD3 training loop: learn (t, t') so that the student's images match the teacher's.

Objective with soft teacher forcing: each sample carries its own student input z' in the
ball ||z' - z|| <= r around its teacher noise z, and the loss is mean_n d(student(z'_n), teacher_n).
After each gradient step of the times, z' takes one SGD step (lr ``shift_lr``), is projected
back onto the ball, and the move is kept only for samples whose loss went down.

Phase 1 learns params1 (RMSprop), phase 2 params1 and params2 (SGD); validation after every
``valid_every`` optimizer steps; on ``patient`` checks without improvement the best state is
reloaded and both learning rates decay; training stops when the phase-2 rate has hit its floor
``lr2_patient`` times, or after the last round.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm import tqdm

from ld3.config import UserError
from ld3.data import SampleSet
from ld3.discretization import LearnedDiscretization, checkpoint_dict
from ld3.io import atomic_write_text
from ld3.timing import Timed

log = logging.getLogger("ld3")

Student = Callable[..., Tensor]  # (z', t, t', c, uc, plans=dict) -> image; see ld3.student.Rollout
Distance = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TrainConfig:
    rounds_v1: int = 2
    rounds_v2: int = 5
    no_v1: bool = False
    lr_time_1: float = 0.005
    lr_time_2: float = 0.01
    momentum_time_1: float = 0.9
    weight_decay_time_1: float = 0.0
    min_lr_time_1: float = 5e-5
    min_lr_time_2: float = 1e-6
    lr_time_decay: float = 0.8
    patient: int = 5
    lr2_patient: int = 5
    bound: float = 0.0
    shift_lr: float = 1.0
    shift_lr_decay: float = 0.5
    train_batch_size: int = 1
    valid_batch_size: int = 10
    valid_every: int = 1
    seed: int = 0


@dataclass
class TrainResult:
    best_loss: float
    best_v1_loss: float | None
    steps: int
    history: list = field(default_factory=list)
    nfe: dict = field(default_factory=dict)
    stopped_early: bool = False


class NumericalError(Exception):
    pass


def _batches(n: int, bs: int, order: list[int] | None = None) -> list[list[int]]:
    idx = order if order is not None else list(range(n))
    return [idx[i:i + bs] for i in range(0, n, bs)]


def _selector(idx: list[int]) -> slice | Tensor:
    """Rows ``idx`` as a slice when they are consecutive (validation batches, batches of one), else
    as an index tensor: a list index is converted to a tensor at every use."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return torch.tensor(idx)


def _clip_grad_norm_(p: Tensor, max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_([p], max_norm)`` for one tensor (same result), without the
    grouping and bookkeeping of the general function, which cost more than the arithmetic here."""
    if p.grad is not None:
        p.grad.mul_(min(max_norm / (float(torch.linalg.vector_norm(p.grad)) + 1e-6), 1.0))


def _project(zp: Tensor, z: Tensor, r: float) -> Tensor:
    """Project each row of z' onto the ball ||z' - z|| <= r (renorm: rows longer than r scaled to r)."""
    return z + torch.renorm(zp - z, p=2, dim=0, maxnorm=r)


class LD3Trainer:
    """Trains a ``LearnedDiscretization`` against teacher images. Takes tensors and callables."""

    def __init__(self, disc: LearnedDiscretization, student: Student, distance: Distance, train: SampleSet,
                 valid: SampleSet, cfg: TrainConfig, device: torch.device | None = None,
                 on_phase_end: Callable[[int, "LD3Trainer"], None] | None = None,
                 count_calls: Callable[[], int] | None = None):
        self.disc, self.student, self.cfg = disc, student, cfg
        self.distance = Timed(distance)  # loss time, forward and backward
        self.device = device or torch.device("cpu")
        self.train, self.valid = train, valid
        self.on_phase_end = on_phase_end
        self.count_calls = count_calls or (lambda: 0)
        self.z_train = train.latent.to(self.device)
        self.z_valid = valid.latent.to(self.device)
        self.zp_train = self.z_train.clone()
        self.zp_valid = self.z_valid.clone()
        self.img_train = train.img.to(self.device)
        self.img_valid = valid.img.to(self.device)
        self.opt1 = torch.optim.RMSprop([disc.params1], lr=cfg.lr_time_1, momentum=cfg.momentum_time_1,
                                        weight_decay=cfg.weight_decay_time_1)
        self.opt2 = torch.optim.SGD([disc.params2], lr=cfg.lr_time_2)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.shift_lr = cfg.shift_lr
        self.history: list[dict] = []
        self.nfe = {"train": 0, "latent_moves": 0, "validation": 0}
        self.step = 0
        self.best_loss = math.inf
        self.best_state = self._params_state()
        self.best_v1_loss: float | None = None
        self.best_v1: dict | None = None
        self.bad_checks = 0
        self.floor_hits = 0
        self.stop = False
        self.phase = 1
        self.round = 0  # rounds finished overall

    # ------------------------------------------------------------------ helpers
    def _cond(self, sset: SampleSet, idx: list[int], sel: slice | Tensor) -> tuple[Any, Any]:
        def pick(v):
            if v is None:
                return None
            if isinstance(v, Tensor):
                return v[sel].to(self.device)
            return [v[i] for i in idx]

        return pick(sset.c), pick(sset.uc)

    def _params_state(self) -> dict:
        return {"params1": self.disc.params1.detach().clone(), "params2": self.disc.params2.detach().clone()}

    def load_params(self, state: dict) -> None:
        with torch.no_grad():
            self.disc.params1.copy_(state["params1"])
            self.disc.params2.copy_(state["params2"])

    def _losses(self, zp: Tensor, img: Tensor, cond: Any, uc: Any, t: Tensor, tp: Tensor,
                plans: dict | None = None) -> Tensor:
        c0 = self.count_calls()
        out = self.distance(self.student(zp, t, tp, cond, uc, plans=plans), img)
        self._last_calls = self.count_calls() - c0
        return out

    def _check_finite(self, value: float, what: str) -> None:
        """``value``: a sum or mean of the step's losses, already read back (one NaN or infinity in the
        losses makes it non-finite; the losses come from t and t', so a bad time shows too)."""
        if not math.isfinite(value):
            raise NumericalError(f"{what} became NaN or infinite at optimizer step {self.step} "
                                 f"(phase {self.phase}); the best checkpoint is kept. Try a smaller "
                                 "--lr_time_1 / --lr_time_2, or --shift_lr")

    def _move_latents(self, zp: Tensor, z: Tensor, grad: Tensor, old: Tensor, img: Tensor, cond: Any, uc: Any,
                      t: Tensor, tp: Tensor, key: str, plans: dict) -> tuple[Tensor, int]:
        """One SGD step of z', projected on the ball; kept only where the loss went down."""
        if self.cfg.bound <= 0 or self.shift_lr <= 0:
            return zp, 0
        cand = _project(zp - self.shift_lr * grad, z, self.cfg.bound)
        with torch.no_grad():
            new = self._losses(cand, img, cond, uc, t.detach(), tp.detach(), plans)
        self.nfe[key] += self._last_calls * zp.shape[0]
        keep = (new < old).reshape(-1, *([1] * (zp.ndim - 1)))
        return torch.where(keep, cand, zp), int(keep.sum())

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> float:
        t, tp = self.disc()
        total, n, plans = 0.0, len(self.valid), {}
        for idx in _batches(n, self.cfg.valid_batch_size):
            sel = _selector(idx)
            c, uc = self._cond(self.valid, idx, sel)
            loss = self._losses(self.zp_valid[sel], self.img_valid[sel], c, uc, t, tp, plans)
            self.nfe["validation"] += self._last_calls * len(idx)
            total += float(loss.sum())
            self._check_finite(total, "the validation loss")
        return total / n

    def move_valid_latents(self) -> int:
        """One pass over the validation set moving its z' (times untouched)."""
        moved, plans = 0, {}
        with torch.no_grad():
            t, tp = self.disc()
        for idx in _batches(len(self.valid), self.cfg.valid_batch_size):
            sel = _selector(idx)
            c, uc = self._cond(self.valid, idx, sel)
            zp = self.zp_valid[sel].clone().requires_grad_(True)
            with torch.enable_grad():
                loss = self._losses(zp, self.img_valid[sel], c, uc, t, tp, plans)
                grad, = torch.autograd.grad(loss.sum(), zp)
            self.nfe["latent_moves"] += self._last_calls * len(idx)
            new, k = self._move_latents(zp.detach(), self.z_valid[sel], grad, loss.detach(), self.img_valid[sel],
                                        c, uc, t, tp, "latent_moves", plans)
            self.zp_valid[sel] = new
            moved += k
        return moved

    def _after_check(self, val: float) -> None:
        cfg = self.cfg
        if val < self.best_loss:
            self.best_loss = val
            self.best_state = self._params_state()
            self.bad_checks = 0
            return
        self.bad_checks += 1
        if self.bad_checks < cfg.patient:
            return
        self.bad_checks = 0
        self.load_params(self.best_state)
        decay = [(self.opt1, cfg.min_lr_time_1)] + ([(self.opt2, cfg.min_lr_time_2)] if self.phase == 2 else [])
        for opt, floor in decay:  # phase 1 decays only lr_time_1 (as the paper's code)
            for g in opt.param_groups:
                g["lr"] = max(g["lr"] * cfg.lr_time_decay, floor)
        if self.phase == 2 and self.opt2.param_groups[0]["lr"] <= cfg.min_lr_time_2:
            self.floor_hits += 1
            if self.floor_hits >= cfg.lr2_patient:
                log.info("phase-2 learning rate at its floor %d times: stopping", self.floor_hits)
                self.stop = True

    # ------------------------------------------------------------------ one round
    def train_round(self, pbar: tqdm | None = None) -> None:
        cfg = self.cfg
        learn1 = self.phase == 1 or not cfg.no_v1
        learn2 = self.phase == 2
        self.disc.params1.requires_grad_(learn1)
        self.disc.params2.requires_grad_(learn2)
        order = torch.randperm(len(self.train), generator=self.gen).tolist()
        for idx in _batches(len(self.train), cfg.train_batch_size, order):
            if self.stop:
                break
            sel = _selector(idx)
            c, uc = self._cond(self.train, idx, sel)
            zp = self.zp_train[sel].clone().requires_grad_(True)
            t, tp = self.disc()
            plans: dict = {}  # the solver's coefficients for (t, t'), shared with the latent move's check
            loss_vec = self._losses(zp, self.img_train[sel], c, uc, t, tp, plans)
            self.nfe["train"] += self._last_calls * len(idx)
            train_loss = float(loss_vec.detach().mean())
            self._check_finite(train_loss, "the training loss")
            self.disc.params1.grad = self.disc.params2.grad = None  # zero_grad(set_to_none=True), cheaper
            loss_vec.mean().backward()
            # latent move under the times that produced the gradient
            grad = zp.grad if len(idx) == 1 else zp.grad * len(idx)  # of each sample's own loss
            new, _ = self._move_latents(zp.detach(), self.z_train[sel], grad, loss_vec.detach(),
                                        self.img_train[sel], c, uc, t.detach(), tp.detach(), "latent_moves",
                                        plans)
            self.zp_train[sel] = new
            if learn1:
                _clip_grad_norm_(self.disc.params1, 1.0)
                self.opt1.step()
            if learn2:
                _clip_grad_norm_(self.disc.params2, 1.0)
                self.opt2.step()
            self.step += 1
            rec = {"step": self.step, "phase": self.phase, "round": self.round + 1,
                   "train_loss": train_loss, "lr1": self.opt1.param_groups[0]["lr"],
                   "lr2": self.opt2.param_groups[0]["lr"]}
            if self.step % cfg.valid_every == 0:
                val = self.validate()
                rec["valid_loss"] = val
                self._after_check(val)
                rec["best_valid"] = self.best_loss
            self.history.append(rec)
            if pbar is not None:
                pbar.update(1)
                # refresh=False: redrawn at tqdm's own pace (10/s), not after every step
                pbar.set_postfix(phase=self.phase, loss=f"{rec['train_loss']:.4g}", best=f"{self.best_loss:.4g}",
                                 refresh=False)
        moved = self.move_valid_latents()
        if moved == 0:
            self.shift_lr *= cfg.shift_lr_decay
        self.round += 1
        log.info("phase %d round %d: best validation %.6g, %d validation latents moved, shift_lr %.4g",
                 self.phase, self.round, self.best_loss, moved, self.shift_lr)

    # ------------------------------------------------------------------ whole run
    def plan(self) -> list[int]:
        """Phase of each round."""
        v1 = 0 if self.cfg.no_v1 else self.cfg.rounds_v1
        return [1] * v1 + [2] * self.cfg.rounds_v2

    def run(self, save_state: Callable[["LD3Trainer"], None] | None = None) -> TrainResult:
        plan = self.plan()
        if self.round == 0 and self.step == 0:
            self.phase = plan[0] if plan else 1
            self.best_loss = self.validate()
            self.best_state = self._params_state()
            self.history.append({"step": 0, "phase": 0, "valid_loss": self.best_loss, "best_valid": self.best_loss})
            log.info("initial validation loss %.6g", self.best_loss)
        steps_per_round = math.ceil(len(self.train) / self.cfg.train_batch_size)
        with tqdm(total=steps_per_round * len(plan), initial=self.step, desc="LD3", unit="step",
                  dynamic_ncols=True, disable=None) as pbar:
            while self.round < len(plan) and not self.stop:
                phase = plan[self.round]
                if phase != self.phase:
                    self._end_phase()
                    self.phase = phase
                self.load_params(self.best_state)
                if self.round > 0:  # validation latents moved last round: re-examine the best state
                    val = self.validate()
                    self._after_check(val)
                    self.history.append({"step": self.step, "phase": self.phase, "valid_loss": val,
                                         "best_valid": self.best_loss})
                self.train_round(pbar)
                if save_state is not None:
                    save_state(self)
        self._end_phase()
        self.load_params(self.best_state)
        return TrainResult(self.best_loss, self.best_v1_loss, self.step, self.history, dict(self.nfe), self.stop)

    def _end_phase(self) -> None:
        if self.phase == 1 and self.best_v1 is None and self.round > 0:
            self.load_params(self.best_state)
            self.best_v1 = checkpoint_dict(self.disc)
            self.best_v1_loss = self.best_loss
        if self.on_phase_end is not None:
            self.load_params(self.best_state)
            self.on_phase_end(self.phase, self)

    # ------------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict:
        return {"disc": {k: v.clone() for k, v in self.disc.state_dict().items()},
                "opt1": self.opt1.state_dict(), "opt2": self.opt2.state_dict(),
                "zp_train": self.zp_train.cpu(), "zp_valid": self.zp_valid.cpu(),
                "gen": self.gen.get_state(), "shift_lr": self.shift_lr, "step": self.step,
                "best_loss": self.best_loss, "best_state": self.best_state, "best_v1_loss": self.best_v1_loss,
                "best_v1": self.best_v1, "bad_checks": self.bad_checks, "floor_hits": self.floor_hits,
                "stop": self.stop, "phase": self.phase, "round": self.round, "nfe": dict(self.nfe),
                "history": json.dumps(self.history)}

    def load_state_dict(self, s: dict) -> None:
        self.disc.load_state_dict(s["disc"])
        self.opt1.load_state_dict(s["opt1"])
        self.opt2.load_state_dict(s["opt2"])
        self.zp_train = s["zp_train"].to(self.device)
        self.zp_valid = s["zp_valid"].to(self.device)
        self.gen.set_state(s["gen"])
        for k in ("shift_lr", "step", "best_loss", "best_state", "best_v1_loss", "best_v1", "bad_checks",
                  "floor_hits", "stop", "phase", "round"):
            setattr(self, k, s[k])
        self.nfe = dict(s["nfe"])
        self.history = json.loads(s["history"])


def save_history(history: list[dict], path: Path) -> None:
    atomic_write_text(path, json.dumps(history, indent=0))


def train_config_from(cfg: dict, steps: int, bound: float, shift_lr: float, lr_time_2: float) -> TrainConfig:
    for k in ("main_train_batch_size", "main_valid_batch_size", "valid_every", "patient"):
        if int(cfg[k]) < 1:
            raise UserError(f"{k} must be >= 1, got {cfg[k]}")
    return TrainConfig(
        rounds_v1=int(cfg["training_rounds_v1"]), rounds_v2=int(cfg["training_rounds_v2"]), no_v1=bool(cfg["no_v1"]),
        lr_time_1=float(cfg["lr_time_1"]), lr_time_2=lr_time_2, momentum_time_1=float(cfg["momentum_time_1"]),
        weight_decay_time_1=float(cfg["weight_decay_time_1"]), min_lr_time_1=float(cfg["min_lr_time_1"]),
        min_lr_time_2=float(cfg["min_lr_time_2"]), lr_time_decay=float(cfg["lr_time_decay"]),
        patient=int(cfg["patient"]), lr2_patient=int(cfg["lr2_patient"]), bound=bound, shift_lr=shift_lr,
        shift_lr_decay=float(cfg["shift_lr_decay"]), train_batch_size=int(cfg["main_train_batch_size"]),
        valid_batch_size=int(cfg["main_valid_batch_size"]), valid_every=int(cfg["valid_every"]), seed=int(cfg["seed"]))


__all__ = ["LD3Trainer", "TrainConfig", "TrainResult", "NumericalError", "train_config_from", "save_history"]
