"""From unit noise to images with a solver and a discretization: the student (and teacher) rollout."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ld3.timing import Timed
from ld3.models.base import Model
from ld3.samplers.paper import PAPER_LACKS, PAPER_SOLVERS, has_paper
from ld3.samplers.solvers import Grid, get_solver, solve, with_final_denoise

log = logging.getLogger("ld3")


class CountingFn:
    """Wraps a model function: counts its calls (one call = one network evaluation per sample),
    times them (``clock``: forward and backward seconds), and with ``checkpointed`` recomputes
    each call's activations in the backward pass instead of storing them (``--low_gpu``)."""

    def __init__(self, fn, checkpointed: bool = False, timed: bool = False):
        self.checkpointed = checkpointed
        self._timed = Timed(self._call, enabled=timed)
        self.fn = fn

    @property
    def calls(self) -> int:
        return self._timed.clock.calls

    @property
    def clock(self):
        return self._timed.clock

    def _call(self, x: Tensor, t: Tensor, cond: Any = None, uc: Any = None) -> Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(self.fn, x, t, cond, uc, use_reentrant=False)
        return self.fn(x, t, cond, uc)

    def __call__(self, x: Tensor, t: Tensor, cond: Any = None, uc: Any = None) -> Tensor:
        return self._timed(x, t, cond, uc)


@dataclass
class SolverSpec:
    """A solver with its options: name, order, the solver's declared options, and the arithmetic
    (``fast``: ours; ``paper``: the paper code's float32 coefficients, ``samplers.paper``)."""

    name: str
    order: int | None = None
    options: dict = field(default_factory=dict)
    arithmetic: str = "fast"

    @classmethod
    def from_cfg(cls, cfg: dict, name: str | None = None, order: int | None = None) -> "SolverSpec":
        """Options read generically: each option the solver declares, from its config key when set."""
        name = name or cfg["solver_name"]
        info = get_solver(name)
        opts: dict[str, Any] = {}
        for opt in info.all_options:
            v = cfg.get(opt.cfg_key)
            if v is not None:
                opts[opt.name] = opt.type(v) if opt.type is not bool else bool(v)
        o = order if order is not None else cfg.get("order")
        arithmetic = str(cfg.get("arithmetic") or "fast")
        for key, value in (PAPER_LACKS.get(name, {}) if arithmetic == "paper" else {}).items():
            if key in opts and opts[key] != value:  # e.g. a yml's lower_order_final, meant for uni_pc, under ipndm
                log.warning("%s under --arithmetic paper: %s ignored (the paper's %s has none)", name, key, name)
                opts[key] = value
        return cls(name, info.default_order if o is None else int(o), opts, arithmetic)

    @property
    def paper(self) -> bool:
        """Whether rollouts use the paper code's arithmetic (only for the solvers and orders it has)."""
        return self.arithmetic == "paper" and has_paper(self.name, self.order)


class Rollout:
    """``rollout(z, grid) -> decoded images``: prior, solver, decoder; counts network calls.

    ``grid = rollout.grid(t, t')`` holds the times and the solver's coefficients; every call with
    the same grid (a training step and the check of its latent move, all validation batches, all
    gen_data batches) computes them once.
    """

    def __init__(self, model: Model, spec: SolverSpec, low_gpu: bool = False, timed: bool = False):
        self.model, self.spec = model, spec
        # The timer's backward hooks regroup the sums of gradients (float rounding): not in the paper's arithmetic.
        self.fn = CountingFn(model.noise_fn, checkpointed=low_gpu, timed=timed and not spec.paper)

    def grid(self, t: Tensor, tp: Tensor | None = None, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Grid:
        """The grid of a rollout from unit noise of ``dtype`` (the paper's arithmetic: float32 times)."""
        return Grid(self.model.schedule, t, tp, dtype=torch.float32 if self.spec.paper else dtype,
                    device=device if device is not None else t.device)

    def latents(self, z: Tensor, grid: "Grid | Tensor | tuple", cond: Any = None, uc: Any = None) -> Tensor:
        if not isinstance(grid, Grid):  # t, or (t, t')
            t, tp = grid if isinstance(grid, tuple) else (grid, None)
            grid = self.grid(t.to(z.device), None if tp is None else tp.to(z.device), dtype=z.dtype)
        x = self.model.schedule.prior(z)
        if self.spec.paper:
            opts = dict(self.spec.options)
            final = bool(opts.pop("final_denoise", False))

            def run(g, _tp):
                return PAPER_SOLVERS[self.spec.name](self.fn, self.model.schedule, x, g.t_v, g.tp_v,
                                                     order=self.spec.order, cond=cond, uc=uc, **opts)

            return with_final_denoise(run, self.fn, self.model.schedule, grid, None, final, cond, uc)
        return solve(self.spec.name, self.fn, self.model.schedule, x, grid, order=self.spec.order, cond=cond,
                     uc=uc, **self.spec.options)

    def __call__(self, z: Tensor, grid: "Grid | Tensor | tuple", cond: Any = None, uc: Any = None) -> Tensor:
        """Images from unit noise ``z`` along ``grid`` (see :meth:`grid`; or times t, or a pair (t, t'))."""
        return self.model.decode(self.latents(z, grid, cond, uc))
