"""Full-batch learning of the discretization (ours, ``--trainer full_batch``; the paper's loop is
``ld3.trainer``, ``--trainer rounds``).

Every iteration computes the exact gradient of the objective over *all* learning samples (in chunks
of ``chunk`` samples, gradients summed, so memory is that of one chunk) and takes one Adam step whose
rate falls from ``lr`` to 0 along a half cosine. The objective is the mean of ``2c(sqrt(1 + d/c) - 1)``
over the samples' distances d (``robust_terms``), with c = ``robust`` (2) times the median distance at the
starting times: d where d << c, 2 sqrt(c d) in the heavy tail (``robust`` 0: the plain mean of d).

    phase 1 (``iters_v1`` iterations): params1 (the times t), Adam at ``lr_1``
    phase 2 (``iters_v2`` iterations): from the best of phase 1, params1 and params2 (t and t'), at ``lr_2``

The best parameters are kept: with the learning samples as the validation set (``--valid_use train``)
each iteration's loss *is* the validation loss of the parameters it was computed at, so choosing
costs nothing; with a separate validation set it is evaluated every ``valid_every`` iterations and at
the end of each phase. The latents are the teacher's (no soft teacher forcing: measured, moving them
in the ball changed nothing on fresh noise, README "Departures"). Nothing is random: the same data and
options give the same schedule, bit for bit, whatever ``--seed`` says.

Why: the paper's loop takes 2-sample steps with RMSprop/SGD; at 4-10 steps the per-sample distances
are heavy-tailed (one sample can carry a fifth of the sum), so its steps are noisy and its end point
depends on the seed. The exact gradient with Adam and a decaying rate reaches lower fresh-noise
distances on the embedded models for less network time (README, "Quality at equal cost"). The plain mean
of the distances, though, fits those few samples: at NFE 10 its schedule was closer to the 100 learning
samples and farther from fresh noise than the paper's; the robust terms keep the tail from setting it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm

from ld3.config import UserError
from ld3.data import SampleSet
from ld3.discretization import LearnedDiscretization, checkpoint_dict
from ld3.distributed import Place
from ld3.optim import Adam
from ld3.timing import Timed
from ld3.trainer import NumericalError, TrainResult, selector, conditions

log = logging.getLogger("ld3")


@dataclass
class FullBatchConfig:
    """The command line's defaults (``test_full_batch_config_defaults_are_the_cli_s``)."""

    iters_v1: int = 40
    iters_v2: int = 40
    lr_1: float = 0.1
    lr_2: float = 0.05
    chunk: int = 50  # samples per forward/backward pass (memory); the step uses the whole set's gradient
    valid_every: int = 10  # iterations between validations, with a separate validation set only
    no_v1: bool = False  # as the paper's --no_v1: no phase 1, and phase 2 learns params2 alone
    save_every: int = 10  # iterations between saved states (resume file, best checkpoints)
    robust: float = 2.0  # the scale c of ``robust_terms`` in medians of the starting distances; 0: the plain mean

    @property
    def phases(self) -> list[tuple[int, int]]:
        """(phase, iterations) in order."""
        return ([] if self.no_v1 else [(1, self.iters_v1)]) + [(2, self.iters_v2)]

    @property
    def total(self) -> int:
        return sum(k for _, k in self.phases)


@dataclass
class FullBatchState:
    """Everything that changes during a run; it is also the resume file."""

    params1: torch.Tensor
    params2: torch.Tensor
    opt1: dict = field(default_factory=dict)
    opt2: dict = field(default_factory=dict)
    it: int = 0  # iterations done, both phases together
    best_loss: float = math.inf
    best: dict | None = None  # params1, params2 of the best evaluated parameters
    scale: float | None = None  # c of robust_terms, fixed at the starting times (None: not yet, or the plain mean)
    best_v1: dict | None = None  # checkpoint (paper format) of the best of phase 1
    best_v1_loss: float | None = None
    history: list = field(default_factory=list)
    nfe: dict = field(default_factory=lambda: {"train": 0, "latent_moves": 0, "validation": 0})


def robust_terms(d: torch.Tensor, c: float | None) -> torch.Tensor:
    """The per-sample terms of the objective: ``2c(sqrt(1 + d/c) - 1)`` (pseudo-Huber on the distance d):
    about d where d << c and 2 sqrt(c d) where d >> c, so a few samples far from the teacher weigh as their
    root; ``d`` itself when ``c`` is None."""
    return d if c is None else 2.0 * c * (torch.sqrt(1.0 + d / c) - 1.0)


def cosine_rate(lr: float, k: int, n: int) -> float:
    """The rate of iteration k of n: lr at k = 0, falling along a half cosine towards 0 at k = n."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * k / n)) if n > 0 else lr


class FullBatchTrainer:
    """Learns a ``LearnedDiscretization`` by full-batch Adam; the same interface as ``LD3Trainer`` for main.py:
    ``run(save_state)``, ``state`` (``best``, ``best_v1``, ``history``), ``state_dict``/``load_state_dict``,
    ``load_params``, ``best_checkpoint``, ``train``/``valid``, ``distance.clock``."""

    def __init__(self, disc: LearnedDiscretization, student, distance: Callable, train: SampleSet,
                 valid: SampleSet, cfg: FullBatchConfig, device: torch.device | None = None,
                 count_calls: Callable[[], int] | None = None, place: Place | None = None):
        for k in ("chunk", "valid_every", "save_every"):
            if getattr(cfg, k) < 1:
                raise UserError(f"{k} must be >= 1, got {getattr(cfg, k)}")
        self.disc, self.student, self.cfg = disc, student, cfg
        self.place = place or Place()
        if self.place.active and len(train) < self.place.world:
            raise UserError(f"{len(train)} learning samples for {self.place.world} processes: give each at least one")
        self.distance = Timed(distance, enabled=not getattr(student.spec, "paper", False))
        self.device = device or torch.device("cpu")
        self.train, self.valid = train, valid
        self.same_sets = valid is train
        self.count_calls = count_calls or (lambda: 0)
        self.state = FullBatchState(disc.params1.detach().clone(), disc.params2.detach().clone())
        self._new_optimizers(self._phase_of(0)[0])

    # ------------------------------------------------------------------ helpers
    def _phase_of(self, it: int) -> tuple[int, int, int]:
        """(phase, first iteration of the phase, its length) of iteration ``it``."""
        start = 0
        for phase, n in self.cfg.phases:
            if it < start + n:
                return phase, start, n
            start += n
        phase, n = self.cfg.phases[-1]
        return phase, start - n, n

    @property
    def phase(self) -> int:
        return self._phase_of(min(self.state.it, max(self.cfg.total - 1, 0)))[0]

    def _new_optimizers(self, phase: int) -> None:
        lr = self.cfg.lr_1 if phase == 1 else self.cfg.lr_2
        self.opt1, self.opt2 = Adam(self.disc.params1, lr=lr), Adam(self.disc.params2, lr=lr)

    def load_params(self, snap: dict) -> None:
        with torch.no_grad():
            self.disc.params1.copy_(snap["params1"])
            self.disc.params2.copy_(snap["params2"])

    def _snapshot(self) -> dict:
        return {"params1": self.disc.params1.detach().clone(), "params2": self.disc.params2.detach().clone()}

    def best_checkpoint(self) -> dict:
        """The checkpoint (paper format) of the best parameters so far (the current ones when none)."""
        now = self._snapshot()
        if self.state.best is not None:
            self.load_params(self.state.best)
        ck = checkpoint_dict(self.disc)
        self.load_params(now)
        return ck

    def _local(self, n: int) -> list[int]:
        """The sample indices this rank handles (all of them in one process)."""
        idx = list(range(n))
        return idx[self.place.rank::self.place.world] if self.place.active else idx

    def _check_finite(self, value: float, what: str) -> None:
        if not math.isfinite(value):
            raise NumericalError(f"{what} became NaN or infinite at iteration {self.state.it} (phase {self.phase}); "
                                 "the best checkpoint is kept. Try a smaller --fb_lr_1 / --fb_lr_2")

    def _chunks(self, sset: SampleSet):
        """(rows, c, uc) of this rank's samples, ``chunk`` at a time."""
        idx = self._local(len(sset))
        for i in range(0, len(idx), self.cfg.chunk):
            part = idx[i:i + self.cfg.chunk]
            sel = selector(part)
            yield sel, *conditions(sset, part, sel, self.device)

    def _distances(self, sset: SampleSet, sel, c: Any, uc: Any, grid, key: str) -> torch.Tensor:
        z = sset.latent[sel].to(self.device)
        c0 = self.count_calls()
        out = self.distance(self.student(z, grid, c, uc).float(), sset.img[sel].to(self.device).float())
        self.state.nfe[key] += (self.count_calls() - c0) * z.shape[0]
        return out

    def _sum(self, v: float) -> float:
        return self.place.sum([v])[0] if self.place.active else v

    # ------------------------------------------------------------------ loss, gradient, validation
    @torch.no_grad()
    def fix_scale(self) -> float | None:
        """c of ``robust_terms``: ``robust`` times the median distance of the learning samples at the starting
        times (all processes' samples together under torchrun); None with ``robust`` 0 or a zero median."""
        if self.cfg.robust <= 0:
            return None
        t, tp = self.disc()
        grid = self.student.grid(t, tp, dtype=self.train.latent.dtype, device=self.device)
        every = torch.zeros(len(self.train), dtype=torch.float64)  # this rank's entries; zeros elsewhere
        mine = [self._distances(self.train, sel, c, uc, grid, "train") for sel, c, uc in self._chunks(self.train)]
        every[self._local(len(self.train))] = torch.cat(mine).double().cpu()
        med = float(torch.from_numpy(self.place.sum_array(every.numpy())).median())
        self._check_finite(med, "the starting distances")
        return self.cfg.robust * med if med > 0 else None

    def loss_and_grad(self) -> float:
        """The objective (the mean of ``robust_terms`` of the distances) over the learning samples at the current
        times; leaves its exact gradient in params1.grad / params2.grad (summed over chunks, and over processes
        under torchrun)."""
        disc, n = self.disc, len(self.train)
        disc.params1.grad = disc.params2.grad = None
        total = 0.0
        t, tp = disc()  # the map and the solver's coefficients once per iteration, kept for every chunk's backward
        grid = self.student.grid(t, tp, dtype=self.train.latent.dtype, device=self.device)
        chunks = list(self._chunks(self.train))
        for k, (sel, c, uc) in enumerate(chunks):
            d = robust_terms(self._distances(self.train, sel, c, uc, grid, "train"), self.state.scale)
            (d.sum() / n).backward(retain_graph=k < len(chunks) - 1)
            total += float(d.detach().sum())
            del d  # this chunk's graph goes; the map's stays for the next
        if self.place.active:
            for p in (disc.params1, disc.params2):
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    self.place.all_reduce(p.grad)
        total = self._sum(total) / n
        self._check_finite(total, "the training loss")
        return total

    @torch.no_grad()
    def evaluate(self, sset: SampleSet | None = None) -> float:
        """The objective (the mean of ``robust_terms`` of the distances) over ``sset`` (default: the validation
        set) at the current times."""
        sset = self.valid if sset is None else sset
        t, tp = self.disc()
        grid = self.student.grid(t, tp, dtype=sset.latent.dtype, device=self.device)
        total = sum(float(robust_terms(self._distances(sset, sel, c, uc, grid, "validation"), self.state.scale)
                          .sum()) for sel, c, uc in self._chunks(sset))
        total = self._sum(total) / len(sset)
        self._check_finite(total, "the validation loss")
        return total

    def _consider(self, loss: float, snap: dict | None = None) -> bool:
        s = self.state
        if loss < s.best_loss:
            s.best_loss, s.best = loss, snap if snap is not None else self._snapshot()
            return True
        return False

    # ------------------------------------------------------------------ the run
    def _end_phase(self, phase: int, rec: dict) -> None:
        """After the last step of a phase: evaluate where it ended; phase 1 leaves best_v1 and phase 2 starts
        from the best parameters with new optimizers."""
        s = self.state
        final = self.evaluate(self.train if self.same_sets else None)
        rec["valid_loss"] = final
        self._consider(final)
        rec["best_valid"] = s.best_loss
        if phase == 1:
            s.best_v1, s.best_v1_loss = self.best_checkpoint(), s.best_loss
        if s.it < self.cfg.total:  # the next phase starts from the best
            self.load_params(s.best)
            self._new_optimizers(self._phase_of(s.it)[0])
        log.info("phase %d: %d iterations, best %s loss %.6g", phase, s.it,
                 "learning" if self.same_sets else "validation", s.best_loss)

    def step(self) -> dict:
        """One iteration: the full-batch loss and gradient, (maybe) validation, one Adam step."""
        s, cfg, disc = self.state, self.cfg, self.disc
        phase, start, n = self._phase_of(s.it)
        k = s.it - start
        learn1, learn2 = not cfg.no_v1, phase == 2
        disc.params1.requires_grad_(learn1)
        disc.params2.requires_grad_(learn2)
        lr = cosine_rate(cfg.lr_1 if phase == 1 else cfg.lr_2, k, n)
        for o in (self.opt1, self.opt2):
            o.param_groups[0]["lr"] = lr
        if s.it == 0 and s.scale is None:
            s.scale = self.fix_scale()
        before = self._snapshot() if self.same_sets else None
        if not self.same_sets and k == 0 and s.it == 0:  # the starting point, on the validation set
            self._consider(self.evaluate())
        loss = self.loss_and_grad()
        rec: dict[str, Any] = {"step": s.it + 1, "phase": phase, "train_loss": loss, "lr1": lr if learn1 else 0.0,
                               "lr2": lr if learn2 else 0.0}
        if self.same_sets:  # this loss is the validation loss of the parameters before the step
            self._consider(loss, before)
            rec["valid_loss"] = loss
        if learn1:
            self.opt1.step()
        if learn2:
            self.opt2.step()
        s.it += 1
        if not self.same_sets and (s.it - start) % cfg.valid_every == 0 and s.it - start < n:
            rec["valid_loss"] = v = self.evaluate()
            self._consider(v)
        if s.it - start == n:
            self._end_phase(phase, rec)
        rec["best_valid"] = s.best_loss
        return rec

    def run(self, save_state: Callable[["FullBatchTrainer"], None] | None = None) -> TrainResult:
        """All iterations (from where a resumed state stopped); leaves the best parameters loaded."""
        s, cfg = self.state, self.cfg
        with tqdm(total=cfg.total, initial=s.it, desc="LD3 full batch", unit="it", dynamic_ncols=True,
                  disable=None) as pbar:
            while s.it < cfg.total:
                rec = self.step()
                s.history.append(rec)
                pbar.update(1)
                pbar.set_postfix(phase=rec["phase"], loss=f"{rec['train_loss']:.4g}", best=f"{s.best_loss:.4g}",
                                 refresh=False)
                if save_state is not None and (s.it % cfg.save_every == 0 or s.it == cfg.total):
                    save_state(self)
        if s.best is not None:
            self.load_params(s.best)
        return TrainResult(s.best_loss, s.best_v1_loss, s.it, s.history, dict(s.nfe), False)

    # ------------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict:
        s = self.state
        s.params1, s.params2 = self.disc.params1.detach().clone(), self.disc.params2.detach().clone()
        s.opt1, s.opt2 = self.opt1.state_dict(), self.opt2.state_dict()
        d = dataclasses.asdict(s)
        d["history"] = json.dumps(s.history)
        d["trainer"] = "full_batch"
        return d

    def load_state_dict(self, d: dict) -> None:
        d = dict(d)
        if d.pop("trainer", None) != "full_batch":
            raise UserError("the saved state was written by the rounds trainer; resume it with --trainer rounds, "
                            "or start again without --resume")
        names = {f.name for f in dataclasses.fields(FullBatchState)}
        if set(d) != names:
            raise UserError(f"the saved state has keys {sorted(set(d) ^ names)} that this version does not "
                            "know or misses; start the run again without --resume")
        d["history"] = json.loads(d["history"])
        self.state = s = FullBatchState(**d)
        self.load_params({"params1": s.params1, "params2": s.params2})
        self._new_optimizers(self._phase_of(min(s.it, max(self.cfg.total - 1, 0)))[0])
        if s.opt1:
            self.opt1.load_state_dict(s.opt1)
        if s.opt2:
            self.opt2.load_state_dict(s.opt2)


__all__ = ["FullBatchConfig", "FullBatchState", "FullBatchTrainer", "cosine_rate"]
