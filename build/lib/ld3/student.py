"""From unit noise to images with a solver and a discretization: the student (and teacher) rollout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ld3.timing import Timed
from models.base import Model
from samplers.solvers import get_solver, solve


class CountingFn:
    """Wraps a model function: counts its calls (one call = one network evaluation per sample),
    times them (``clock``: forward and backward seconds), and with ``checkpointed`` recomputes
    each call's activations in the backward pass instead of storing them (``--low_gpu``)."""

    def __init__(self, fn, checkpointed: bool = False, timed: bool = True):
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
    """A solver with its options: name, order, and per-solver options (unipc variant, lower_order_final)."""

    name: str
    order: int | None = None
    options: dict = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, cfg: dict, name: str | None = None, order: int | None = None) -> "SolverSpec":
        name = name or cfg["solver_name"]
        info = get_solver(name)
        opts: dict[str, Any] = {}
        if name == "uni_pc":
            opts["variant"] = cfg.get("unipc_variant", "bh2")
        if name in ("uni_pc", "dpm_solver++"):
            opts["lower_order_final"] = bool(cfg.get("lower_order_final", True))
        o = order if order is not None else cfg.get("order")
        return cls(name, info.default_order if o is None else int(o), opts)


class Rollout:
    """``rollout(z, t, t') -> decoded images``: prior, solver, decoder; counts network calls."""

    def __init__(self, model: Model, spec: SolverSpec, low_gpu: bool = False):
        self.model, self.spec = model, spec
        self.fn = CountingFn(model.noise_fn, checkpointed=low_gpu)

    def latents(self, z: Tensor, t: Tensor, tp: Tensor | None = None, cond: Any = None, uc: Any = None,
                plans: dict | None = None) -> Tensor:
        x = self.model.schedule.prior(z)
        return solve(self.spec.name, self.fn, self.model.schedule, x, t, tp, order=self.spec.order,
                     cond=cond, uc=uc, plans=plans, **self.spec.options)

    def __call__(self, z: Tensor, t: Tensor, tp: Tensor | None = None, cond: Any = None, uc: Any = None,
                 plans: dict | None = None) -> Tensor:
        """Images from unit noise ``z``. ``plans``: a dict shared by calls on the same (t, t'), in which
        the solver keeps its coefficients (computed by the first call, reused by the others)."""
        return self.model.decode(self.latents(z, t, tp, cond, uc, plans))
