"""The LD3 training loop: learn (t, t') so that the student's images match the teacher's.

Objective with soft teacher forcing: each sample carries its own student input z' in the
ball ||z' - z|| <= r around its teacher noise z, and the loss is mean_n d(student(z'_n), teacher_n).
After each gradient step of the times, z' takes one SGD step (lr ``shift_lr``), is projected
back onto the ball, and the move is kept only for samples whose loss went down.

The loop follows the paper's code (``trainer.py``), step for step:

    round r (phase 1 for the first ``rounds_v1`` rounds, then phase 2):
        r > 0: reload the best parameters (not the latents); examine
        r = 0: examine                                           (the initial validation)
        train pass, in a random order:  per batch
            loss, backward; time step(s) with gradient clipping 1; step += 1
            every ``valid_every`` steps: examine; stop if the phase-2 rate hit its floor lr2_patient times
            latent move of the batch (SGD step, projection, kept where the loss went down)
        validation pass (when the ball has a radius): move the validation latents
        no validation latent moved: shift_lr *= shift_lr_decay
    examine = validate; a better loss becomes the best state; ``patient`` checks without improvement
        reload the best state and decay the learning rates (phase 1: lr_time_1 only; phase 2: both)

Where we depart from the paper's code on purpose, ``TrainConfig`` has a switch (``paper_config``
gives the paper's values; README, "Departures from the paper's code", has the measured effects):
``valid_every``, ``eval_on_one``, ``latent_step``, ``latent_check``, ``reload_latents``,
``paper_average``. The random order is drawn as the paper's DataLoaders draw it, from
``rng`` (the global generator under ``--paper_compat``, as the paper; a private one seeded by
``--seed`` otherwise).

All that changes during a run is one ``TrainState``, which is also the resume file.
"""

from __future__ import annotations

import dataclasses
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
from ld3.distributed import Place
from ld3.data import SampleSet
from ld3.discretization import LearnedDiscretization, checkpoint_dict
from ld3.io import atomic_write_text
from ld3.optim import SGD, RMSprop
from ld3.timing import Timed

log = logging.getLogger("ld3")

Distance = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TrainConfig:
    """The hyper-parameters (resolved as main.py does) and the departure switches. The defaults are the
    command line's at NFE 10 (``lr_time_2`` = 0.1 / NFE, ``shift_lr`` = 12 / NFE), except ``bound``: 0
    here (latents fixed), 0.001 d / NFE^2 on the command line (``test_train_config_defaults_are_the_cli_s``)."""

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
    shift_lr: float = 1.2
    shift_lr_decay: float = 0.5
    train_batch_size: int = 1
    valid_batch_size: int = 10
    # departures from the paper's code (ours / the paper's)
    valid_every: int = 10  # validate every k optimizer steps / after every step (1)
    eval_on_one: bool = False  # the paper validates on the first validation batch until the first patience event
    latent_step: str = "sample"  # z' step on each sample's own loss / on the batch-mean loss ("mean")
    latent_check: str = "same_times"  # a move is checked under the times that gave its gradient / the new ones
    reload_latents: bool = False  # a patience reload also restores the validation latents of the best state
    paper_average: bool = False  # validation loss = mean over samples / mean of the batch means

    @property
    def phases(self) -> list[int]:
        """The phase of each round: the two phases described as data (with ``no_v1`` too: the paper's
        code then trains params2 alone in every round, and phase 1 still decays lr_time_1 only)."""
        return [1] * self.rounds_v1 + [2] * self.rounds_v2


PAPER_SWITCHES = {"valid_every": 1, "eval_on_one": True, "latent_step": "mean", "latent_check": "new_times",
                  "reload_latents": True, "paper_average": True}
"""The paper's values of ``TrainConfig``'s departure switches."""


@dataclass
class TrainState:
    """Everything that changes during a run; ``torch.save(dataclasses.asdict(state))`` is the resume file."""

    params1: Tensor
    params2: Tensor
    zp_train: Tensor  # the training samples' moved latents z'
    zp_valid: Tensor  # the validation samples' moved latents
    opt1: dict = field(default_factory=dict)
    opt2: dict = field(default_factory=dict)
    rng: Tensor | None = None  # state of the generator of the data order
    # With reload_latents, the latents of the paper's datasets (``self.train_data`` / ``valid_data``): set at
    # the end of each pass, restored from the best state by a patience reload; validation reads data_valid,
    # and each train pass starts from data_train (each validation pass from data_valid).
    data_train: Tensor | None = None
    data_valid: Tensor | None = None
    # The paper's training set is rebuilt after each pass in the order that pass visited it, and the next
    # pass shuffles that order: the visit order is train_order[randperm], which becomes the new train_order.
    train_order: list = field(default_factory=list)
    step: int = 0
    round: int = 0  # rounds finished
    shift_lr: float = 1.0
    lr1: float = 0.0
    lr2: float = 0.0
    best_loss: float = math.inf
    best: dict | None = None  # params1, params2 (and data_train, data_valid) of the best check
    best_v1: dict | None = None  # checkpoint (paper format) of the best check of phase 1
    best_v1_loss: float | None = None
    count_worse: int = 0
    floor_hits: int = 0
    eval_on_one: bool = False
    stopped: bool = False
    history: list = field(default_factory=list)
    nfe: dict = field(default_factory=lambda: {"train": 0, "latent_moves": 0, "validation": 0})


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


def _draw(gen: torch.Generator) -> int:
    """One draw as a DataLoader iterator (or a RandomSampler) makes it: an int64 from ``gen``."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=gen).item())


def paper_permutation(gen: torch.Generator, n: int) -> list[int]:
    """The order of one pass of ``DataLoader(shuffle=True)`` (generator None) drawing from ``gen``: its
    iterator draws its base seed, its RandomSampler a seed for its own generator, then randperm."""
    _draw(gen)
    return torch.randperm(n, generator=torch.Generator().manual_seed(_draw(gen))).tolist()


def _batches(idx: list[int], bs: int) -> list[list[int]]:
    return [idx[i:i + bs] for i in range(0, len(idx), bs)]


def selector(idx: list[int]) -> slice | Tensor:
    """Rows ``idx`` as a slice when they are consecutive (validation batches, batches of one), else
    as an index tensor: a list index is converted to a tensor at every use."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return torch.tensor(idx)


def conditions(sset: SampleSet, idx: list[int], sel: slice | Tensor, device: torch.device) -> tuple[Any, Any]:
    """(c, uc) of rows ``idx`` (``sel``: the same rows as a slice or index tensor): tensors indexed and moved to
    ``device``, lists picked, None kept."""
    def pick(v):
        if v is None:
            return None
        if isinstance(v, Tensor):
            return v[sel].to(device)
        return [v[i] for i in idx]

    return pick(sset.c), pick(sset.uc)


def clip_grad_norm_(p: Tensor, max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_([p], max_norm)`` for one tensor (same result), without the
    grouping and bookkeeping of the general function, which cost more than the arithmetic here."""
    if p.grad is not None:
        p.grad.mul_(torch.clamp(max_norm / (torch.linalg.vector_norm(p.grad) + 1e-6), max=1.0))


def project(zp: Tensor, z: Tensor, r: float) -> Tensor:
    """Each row of z' moved onto the ball ||z' - z|| <= r where it lies outside: z + r (z' - z) / ||z' - z||."""
    flat, z0 = zp.reshape(zp.shape[0], -1), z.reshape(z.shape[0], -1)
    diff = flat - z0
    norm = diff.norm(dim=1, keepdim=True)
    out = torch.where(norm > r, z0 + r * diff / norm, flat)
    return out.reshape(zp.shape)


class LD3Trainer:
    """Trains a ``LearnedDiscretization`` against teacher images. Takes tensors and callables.

    ``student(z', grid, c, uc) -> images`` and ``student.grid(t, t')`` (``ld3.student.Rollout``);
    ``distance(images, teacher) -> one value per sample``.
    """

    def __init__(self, disc: LearnedDiscretization, student, distance: Distance, train: SampleSet,
                 valid: SampleSet, cfg: TrainConfig, device: torch.device | None = None,
                 rng: torch.Generator | None = None, seed: int = 0,
                 on_improve: Callable[["LD3Trainer"], None] | None = None,
                 count_calls: Callable[[], int] | None = None, place: Place | None = None):
        for k in ("train_batch_size", "valid_batch_size", "valid_every", "patient"):
            if getattr(cfg, k) < 1:
                raise UserError(f"{k} must be >= 1, got {getattr(cfg, k)}")
        self.disc, self.student, self.cfg = disc, student, cfg
        # under torchrun: each rank rolls out its share of every batch; the sums that decisions rest on
        # (losses, gradients, moved latents) are reduced, so every rank decides alike
        self.place = place or Place()
        if self.place.active and cfg.train_batch_size < self.place.world:
            raise UserError(f"main_train_batch_size {cfg.train_batch_size} is below the {self.place.world} "
                            "processes: give each at least one sample per batch")
        last = len(train) % cfg.train_batch_size
        if self.place.active and 0 < last < self.place.world:
            raise UserError(f"the last training batch holds {last} samples, fewer than the {self.place.world} "
                            "processes: choose num_train so that every batch has one sample per process")
        # loss time, forward and backward (not in the paper's arithmetic: the hooks regroup gradient sums)
        self.distance = Timed(distance, enabled=not getattr(student.spec, "paper", False))
        self.device = device or torch.device("cpu")
        self.train, self.valid = train, valid
        self.on_improve = on_improve
        self.count_calls = count_calls or (lambda: 0)
        self.z_train, self.z_valid = train.latent.to(self.device), valid.latent.to(self.device)
        self.img_train, self.img_valid = train.img.to(self.device), valid.img.to(self.device)
        self.opt1 = RMSprop(disc.params1, lr=cfg.lr_time_1, momentum=cfg.momentum_time_1,
                            weight_decay=cfg.weight_decay_time_1)  # torch.optim's, without torch._dynamo
        self.opt2 = SGD(disc.params2, lr=cfg.lr_time_2)
        self.rng = rng if rng is not None else torch.Generator().manual_seed(int(seed))
        self.private_rng = rng is None
        self.state = TrainState(disc.params1.detach().clone(), disc.params2.detach().clone(),
                                self.z_train.clone(), self.z_valid.clone(), shift_lr=cfg.shift_lr,
                                lr1=cfg.lr_time_1, lr2=cfg.lr_time_2, eval_on_one=cfg.eval_on_one)
        self.state.train_order = list(range(len(train)))
        if cfg.reload_latents:
            self.state.data_train, self.state.data_valid = self.z_train.clone(), self.z_valid.clone()

    # ------------------------------------------------------------------ helpers
    @property
    def phase(self) -> int:
        phases = self.cfg.phases
        return phases[min(self.state.round, len(phases) - 1)] if phases else 1

    def _snapshot(self) -> dict:
        s = self.state
        snap = {"params1": self.disc.params1.detach().clone(), "params2": self.disc.params2.detach().clone()}
        if self.cfg.reload_latents:
            snap.update(data_train=s.data_train.clone(), data_valid=s.data_valid.clone(), train_order=list(s.train_order))
        return snap

    def load_params(self, snap: dict) -> None:
        with torch.no_grad():
            self.disc.params1.copy_(snap["params1"])
            self.disc.params2.copy_(snap["params2"])

    # ------------------------------------------------------------------ several processes
    def _local(self, idx: list[int]) -> list[int]:
        """This rank's share of batch ``idx`` (all of it in one process)."""
        return idx[self.place.rank::self.place.world] if self.place.active else idx

    def _sum(self, v: float) -> float:
        return self.place.sum([v])[0] if self.place.active else v

    def _share_rows(self, dst: Tensor, idx: list[int], loc: list[int]) -> None:
        """After each rank updated its rows ``loc`` of ``dst``, every rank holds every row of ``idx``."""
        if not self.place.active:
            return
        full = torch.zeros((len(idx),) + tuple(dst.shape[1:]), dtype=dst.dtype, device=dst.device)
        pos = {i: k for k, i in enumerate(idx)}
        if loc:
            full[torch.tensor([pos[i] for i in loc], device=dst.device)] = dst[torch.tensor(loc, device=dst.device)]
        self.place.all_reduce(full)  # each row comes from exactly one rank: the sum is that row
        dst[torch.tensor(idx, device=dst.device)] = full

    def _reduce_grads(self) -> None:
        if not self.place.active:
            return
        for p in (self.disc.params1, self.disc.params2):
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.place.all_reduce(p.grad)

    def _grid(self, z: Tensor, t: Tensor, tp: Tensor):
        return self.student.grid(t, tp, dtype=z.dtype, device=self.device)

    def _losses(self, zp: Tensor, img: Tensor, cond: Any, uc: Any, grid, key: str) -> Tensor:
        """Per-sample distances of the student's images from ``zp`` to ``img``; counts the evaluations."""
        c0 = self.count_calls()
        out = self.distance(self.student(zp, grid, cond, uc).float(), img.float())
        self.state.nfe[key] += (self.count_calls() - c0) * zp.shape[0]
        return out

    def _check_finite(self, value: float, what: str) -> None:
        """``value``: a sum or mean of the step's losses, already read back (one NaN or infinity in the
        losses makes it non-finite; the losses come from t and t', so a bad time shows too)."""
        if not math.isfinite(value):
            raise NumericalError(f"{what} became NaN or infinite at optimizer step {self.state.step} "
                                 f"(phase {self.phase}); the best checkpoint is kept. Try a smaller "
                                 "--lr_time_1 / --lr_time_2, or --shift_lr")

    def _latent_step(self, zp: Tensor, z: Tensor, grad: Tensor, batch: int | None = None) -> Tensor:
        """One SGD step of z' (on the batch-mean loss, or on each sample's own), projected onto the ball;
        ``batch``: the size of the whole batch whose mean gave ``grad`` (default: these rows)."""
        g = grad if self.cfg.latent_step == "mean" else grad * (zp.shape[0] if batch is None else batch)
        return project(torch.add(zp, g, alpha=-self.state.shift_lr), z, self.cfg.bound)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> float:
        """Validation loss at the current times, on the (moved) validation latents.

        Draws one number from the order generator, as the paper's validation loader does."""
        s, cfg = self.state, self.cfg
        _draw(self.rng)
        zv = s.data_valid if s.data_valid is not None else s.zp_valid
        t, tp = self.disc()
        grid = self._grid(zv, t, tp)
        batches = _batches(list(range(len(self.valid))), cfg.valid_batch_size)
        if s.eval_on_one:
            batches = batches[:1]
        total, n = 0.0, 0
        for idx in batches:
            if self.place.active:  # this rank's share; the batch's sum over ranks
                loc = self._local(idx)
                part = 0.0
                if loc:
                    sel = selector(loc)
                    c, uc = conditions(self.valid, loc, sel, self.device)
                    part = float(self._losses(zv[sel], self.img_valid[sel], c, uc, grid, "validation").sum())
                part = self._sum(part)
                total += part / len(idx) if cfg.paper_average else part
            else:
                sel = selector(idx)
                c, uc = conditions(self.valid, idx, sel, self.device)
                loss = self._losses(zv[sel], self.img_valid[sel], c, uc, grid, "validation")
                total += float(loss.mean()) if cfg.paper_average else float(loss.sum())
            n += 1 if cfg.paper_average else len(idx)
            self._check_finite(total, "the validation loss")
        return total / n

    def examine(self) -> dict:
        """Validate and act on it: a new best, or one more check without improvement (and, after
        ``patient`` of them, reload the best state and decay the learning rates)."""
        s, cfg = self.state, self.cfg
        val = self.validate()
        rec = {"step": s.step, "phase": self.phase, "round": s.round, "valid_loss": val}
        if val < s.best_loss:
            s.best_loss, s.count_worse, s.best = val, 0, self._snapshot()
            if self.phase == 1:
                s.best_v1, s.best_v1_loss = checkpoint_dict(self.disc), val
            if self.on_improve is not None:
                self.on_improve(self)
        else:
            s.count_worse += 1
        if s.count_worse >= cfg.patient:
            rec["reload"] = True
            self.load_params(s.best)
            if cfg.reload_latents:
                s.data_train, s.data_valid = s.best["data_train"].clone(), s.best["data_valid"].clone()
                s.train_order = list(s.best["train_order"])
            s.count_worse = 0
            if s.eval_on_one:  # the paper's first patience event: validate on the whole set from now on
                s.eval_on_one = False
                s.best_loss = rec["revalidation"] = self.validate()
            else:
                self._decay()
        rec["best_valid"] = s.best_loss
        return rec

    def _decay(self) -> None:
        s, cfg = self.state, self.cfg
        s.lr1 = max(s.lr1 * cfg.lr_time_decay, cfg.min_lr_time_1)
        if self.phase == 2:  # phase 1 decays lr_time_1 only (as the paper's code)
            s.lr2 = max(s.lr2 * cfg.lr_time_decay, cfg.min_lr_time_2)
            if s.lr2 <= cfg.min_lr_time_2:
                s.floor_hits += 1
                if s.floor_hits >= cfg.lr2_patient:
                    log.info("phase-2 learning rate at its floor %d times: stopping", s.floor_hits)
                    s.stopped = True
        self._set_lrs()

    def _set_lrs(self) -> None:
        self.opt1.param_groups[0]["lr"] = self.state.lr1
        self.opt2.param_groups[0]["lr"] = self.state.lr2

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, idx: list[int]) -> dict:
        """One batch: loss, backward, time step, maybe a check, the latent move. Returns its record."""
        s, cfg, disc = self.state, self.cfg, self.disc
        full, idx = idx, self._local(idx)  # under torchrun: this rank's rows of the batch
        sel = selector(idx)
        c, uc = conditions(self.train, idx, sel, self.device)
        zp = s.zp_train[sel].clone().requires_grad_(True)
        t, tp = disc()
        grid = self._grid(zp, t, tp)
        losses = self._losses(zp, self.img_train[sel], c, uc, grid, "train")
        loss = losses.sum() / len(full) if self.place.active else losses.mean()
        train_loss = self._sum(float(loss.detach()))
        self._check_finite(train_loss, "the training loss")
        disc.params1.grad = disc.params2.grad = None  # zero_grad(set_to_none=True)
        loss.backward()
        self._reduce_grads()  # the whole batch's gradient of the time parameters, on every rank
        cand = self._latent_step(zp.detach(), self.z_train[sel], zp.grad, len(full))
        before = losses.detach()
        new = None
        if cfg.latent_check == "same_times":  # the times that gave the gradient; their grid is reused
            with torch.no_grad():
                new = self._losses(cand, self.img_train[sel], c, uc, grid, "latent_moves")
        learn1, learn2 = disc.params1.requires_grad, disc.params2.requires_grad
        if learn1:
            clip_grad_norm_(disc.params1, 1.0)
            self.opt1.step()
        if learn2:
            clip_grad_norm_(disc.params2, 1.0)
            self.opt2.step()
        s.step += 1
        rec = {"step": s.step, "phase": self.phase, "round": s.round + 1, "train_loss": train_loss,
               "lr1": s.lr1, "lr2": s.lr2}
        if s.step % cfg.valid_every == 0:
            rec.update({k: v for k, v in self.examine().items()
                        if k in ("valid_loss", "best_valid", "reload", "revalidation")})
            if s.stopped:
                return rec
        if new is None:  # the paper's order: the move is checked under the times after the step (and check)
            with torch.no_grad():
                t, tp = disc()
                new = self._losses(cand, self.img_train[sel], c, uc, self._grid(cand, t, tp), "latent_moves")
        keep = (new < before).reshape(-1, *([1] * (cand.ndim - 1)))
        s.zp_train[sel] = torch.where(keep, cand, zp.detach())
        self._share_rows(s.zp_train, full, idx)
        rec["moved"] = int(self._sum(float(keep.sum())))
        return rec

    def move_valid_latents(self) -> int:
        """One pass over the validation set moving its z' (times untouched); returns how many moved.

        Batches of the training batch size when z' steps on the batch-mean loss (the paper's
        validation-latent loader), else of the validation batch size (then the batch does not matter).
        """
        s, cfg = self.state, self.cfg
        _draw(self.rng)
        bs = cfg.train_batch_size if cfg.latent_step == "mean" else cfg.valid_batch_size
        with torch.no_grad():
            t, tp = self.disc()
        grid = self._grid(s.zp_valid, t, tp)
        moved = 0
        for full in _batches(list(range(len(self.valid))), bs):
            idx = self._local(full)  # under torchrun: this rank's rows
            if idx:
                sel = selector(idx)
                c, uc = conditions(self.valid, idx, sel, self.device)
                zp = s.zp_valid[sel].clone().requires_grad_(True)
                with torch.enable_grad():
                    losses = self._losses(zp, self.img_valid[sel], c, uc, grid, "latent_moves")
                    mean = losses.sum() / len(full) if self.place.active else losses.mean()
                    grad, = torch.autograd.grad(mean, zp)
                cand = self._latent_step(zp.detach(), self.z_valid[sel], grad, len(full))
                with torch.no_grad():
                    new = self._losses(cand, self.img_valid[sel], c, uc, grid, "latent_moves")
                keep = (new < losses.detach()).reshape(-1, *([1] * (cand.ndim - 1)))
                s.zp_valid[sel] = torch.where(keep, cand, zp.detach())
                n_moved = float(keep.sum())
            else:
                n_moved = 0.0
            self._share_rows(s.zp_valid, full, idx)
            moved += int(self._sum(n_moved))
        if s.data_valid is not None:
            s.data_valid = s.zp_valid.clone()
        return moved

    # ------------------------------------------------------------------ rounds
    def train_round(self, pbar: tqdm | None = None) -> None:
        s, cfg, disc = self.state, self.cfg, self.disc
        phase = self.phase
        disc.params1.requires_grad_(not cfg.no_v1)  # --no_v1: params2 alone, in every round (as the paper)
        disc.params2.requires_grad_(phase == 2 or cfg.no_v1)
        if s.round > 0:  # each round starts from the best state (its parameters; the latents stay)
            self.load_params(s.best)
            s.count_worse = 0
        s.history.append(self.examine())
        if s.data_train is not None:  # the passes run over the datasets as they are now
            s.zp_train, s.zp_valid = s.data_train.clone(), s.data_valid.clone()
        order = [s.train_order[j] for j in paper_permutation(self.rng, len(self.train))]
        for idx in _batches(order, cfg.train_batch_size):
            rec = self.train_step(idx)
            s.history.append(rec)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(phase=phase, loss=f"{rec['train_loss']:.4g}", best=f"{s.best_loss:.4g}",
                                 refresh=False)
            if s.stopped:
                return
        if cfg.bound > 0:  # the paper rebuilds its training set (in visit order) only when latents move
            s.train_order = order
            if s.data_train is not None:
                s.data_train = s.zp_train.clone()
        moved = self.move_valid_latents() if cfg.bound > 0 else None
        s.round += 1
        if moved == 0:
            s.shift_lr *= cfg.shift_lr_decay
        log.info("phase %d round %d: best validation %.6g, %s validation latents moved, shift_lr %.4g",
                 phase, s.round, s.best_loss, "no" if moved is None else moved, s.shift_lr)

    def run(self, save_state: Callable[["LD3Trainer"], None] | None = None) -> TrainResult:
        """All rounds (from where a resumed state stopped); leaves the best parameters loaded."""
        s, cfg = self.state, self.cfg
        steps_per_round = math.ceil(len(self.train) / cfg.train_batch_size)
        self._set_lrs()
        with tqdm(total=steps_per_round * len(cfg.phases), initial=min(s.step, steps_per_round * len(cfg.phases)),
                  desc="LD3", unit="step", dynamic_ncols=True, disable=None) as pbar:
            while s.round < len(cfg.phases) and not s.stopped:
                self.train_round(pbar)
                if save_state is not None:
                    save_state(self)
        if s.best is not None:
            self.load_params(s.best)
        return TrainResult(s.best_loss, s.best_v1_loss, s.step, s.history, dict(s.nfe), s.stopped)

    # ------------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict:
        s = self.state
        s.params1, s.params2 = self.disc.params1.detach().clone(), self.disc.params2.detach().clone()
        s.opt1, s.opt2 = self.opt1.state_dict(), self.opt2.state_dict()
        s.rng = self.rng.get_state()
        d = dataclasses.asdict(s)
        d["history"] = json.dumps(s.history)
        return d

    def load_state_dict(self, d: dict) -> None:
        names = {f.name for f in dataclasses.fields(TrainState)}
        if set(d) != names:
            raise UserError(f"the saved state has keys {sorted(set(d) ^ names)} that this version does not "
                            "know or misses; start the run again without --resume")
        d = dict(d, history=json.loads(d["history"]))
        self.state = TrainState(**d)
        s = self.state
        for k in ("zp_train", "zp_valid", "data_train", "data_valid"):
            if getattr(s, k) is not None:
                setattr(s, k, getattr(s, k).to(self.device))
        self.load_params({"params1": s.params1, "params2": s.params2})
        self.opt1.load_state_dict(s.opt1)
        self.opt2.load_state_dict(s.opt2)
        self.rng.set_state(s.rng)
        self._set_lrs()


def save_history(history: list[dict], path: Path) -> None:
    atomic_write_text(path, json.dumps(history, indent=0))


def train_config_from(cfg: dict, bound: float, shift_lr: float, lr_time_2: float) -> TrainConfig:
    """``TrainConfig`` from resolved options: every field of the same name, plus the derived values."""
    names = {"training_rounds_v1": "rounds_v1", "training_rounds_v2": "rounds_v2",
             "main_train_batch_size": "train_batch_size", "main_valid_batch_size": "valid_batch_size"}
    kw: dict[str, Any] = {"bound": bound, "shift_lr": shift_lr, "lr_time_2": lr_time_2,
                          "paper_average": cfg.get("arithmetic") == "paper"}
    for f in dataclasses.fields(TrainConfig):
        key = next((k for k, v in names.items() if v == f.name), f.name)
        if f.name in kw or key not in cfg or cfg[key] is None:
            continue
        kw[f.name] = type(f.default)(cfg[key]) if not isinstance(f.default, bool) else bool(cfg[key])
    return TrainConfig(**kw)


__all__ = ["LD3Trainer", "TrainConfig", "TrainState", "TrainResult", "NumericalError", "PAPER_SWITCHES",
           "train_config_from", "save_history", "paper_permutation", "project", "clip_grad_norm_"]
