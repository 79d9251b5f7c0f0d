"""A learned LD3 schedule as a diffusers scheduler: ``pipe(..., scheduler=...)`` samples as ld3 does.

``ld3_scheduler(run, pipe.scheduler)`` returns an ``LD3Scheduler`` for a learned run: the pipeline
calls its network at the learned times t'_i (``scheduler.timesteps``, in the network's own time) and
each ``step`` advances ld3's own solver (any solver, order and option of the run, t' != t included):
the solver runs as it does in ld3, and every network call it makes is handed to the pipeline's loop
(a worker thread waits for the pipeline's network output at each call). The images therefore equal
ld3's own sampling with the same solver to float32 rounding (``tests/test_diffusers_scheduler.py``
checks it on tiny offline Stable Diffusion, SD3 and Flux pipelines).

    from diffusers import StableDiffusionPipeline
    from ld3.diffusers_scheduler import ld3_scheduler

    pipe = StableDiffusionPipeline.from_pretrained("path/to/sd15")
    pipe.scheduler = ld3_scheduler("logs/sd15/RUN", pipe.scheduler)
    image = pipe("a photo of a cat", guidance_scale=7.5).images[0]   # num_inference_steps is the run's

The noise schedule comes from the pipeline's own scheduler config (VP ``betas`` and its
``prediction_type``, epsilon or v_prediction; rectified flow for FlowMatch schedulers, whose network
predicts the velocity). Flow pipelines (SD3, Flux) do not scale their starting noise: pass
``latents = scheduler.init_noise_sigma * noise`` to start where ld3 starts (x_T = 0.999 z).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from ld3.errors import UserError
from ld3.samplers.schedules import FlowSchedule, NoiseSchedule, VPDiscreteSchedule
from ld3.samplers.solvers import Grid, get_solver, solve


@dataclass
class SchedulerOutput:
    prev_sample: Tensor


class _Stop(Exception):
    pass


def schedule_of(scheduler: Any) -> tuple[NoiseSchedule, str]:
    """(noise schedule, prediction type) of a diffusers scheduler (or its config): rectified flow for the
    FlowMatch schedulers (``flow``: the network predicts the velocity), else the VP discrete schedule
    of its betas with its ``prediction_type`` (epsilon or v_prediction)."""
    cfg = dict(getattr(scheduler, "config", scheduler))
    name = str(cfg.get("_class_name") or type(scheduler).__name__)
    if "FlowMatch" in name or cfg.get("use_flow_sigmas"):
        return FlowSchedule(), "flow"
    n = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
    elif cfg.get("beta_schedule", "linear") == "scaled_linear":
        betas = torch.linspace(float(cfg["beta_start"]) ** 0.5, float(cfg["beta_end"]) ** 0.5, n,
                               dtype=torch.float64) ** 2
    elif cfg.get("beta_schedule", "linear") == "linear":
        betas = torch.linspace(float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02)), n,
                               dtype=torch.float64)
    else:
        raise UserError(f"beta_schedule {cfg.get('beta_schedule')!r} is not supported (linear, scaled_linear)")
    pred = str(cfg.get("prediction_type", "epsilon"))
    if pred not in ("epsilon", "v_prediction"):
        raise UserError(f"prediction_type {pred!r} is not supported (epsilon, v_prediction)")
    return VPDiscreteSchedule(betas=betas), pred


class LD3Scheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs ld3's solver along learned times (see the module docstring).

    ``timesteps``: one entry per network call, in the network's time (``schedule.model_time``: the
    U-Net's training step, 1000 t for flows); ``step`` returns the state at which the network is called
    next, and after the last call the solver's result.
    """

    order = 1

    @register_to_config
    def __init__(self, t: list[float], t_prime: list[float], solver_name: str, solver_order: int | None = None,
                 solver_options: dict | None = None, prediction_type: str = "epsilon", schedule: str = "vp_discrete",
                 num_train_timesteps: int = 1000, alphas_cumprod: list[float] | None = None):
        if schedule == "flow":
            self.schedule: NoiseSchedule = FlowSchedule()
        else:
            self.schedule = VPDiscreteSchedule(alphas_cumprod=torch.tensor(alphas_cumprod, dtype=torch.float64))
        info = get_solver(solver_name)
        self.solver_order = info.default_order if solver_order is None else int(solver_order)
        self._t = torch.tensor(t, dtype=torch.float64)
        self._tp = torch.tensor(t_prime, dtype=torch.float64)
        self.init_noise_sigma = float(self.schedule.prior(torch.ones((), dtype=torch.float64)))
        self._call_times = self._dry_run()
        self.timesteps = self.schedule.model_time(self._call_times).float()
        self.num_inference_steps = len(self.timesteps)
        self._worker: threading.Thread | None = None
        self._step_index: int | None = None

    # ------------------------------------------------------------------ the times of the network calls
    def _run(self, model_fn, x: Tensor) -> Tensor:
        grid = Grid(self.schedule, self._t.to(x.device), self._tp.to(x.device), dtype=x.dtype, device=x.device)
        return solve(self.config.solver_name, model_fn, self.schedule, x, grid, order=self.solver_order,
                     **dict(self.config.solver_options or {}))

    def _dry_run(self) -> Tensor:
        times: list[float] = []

        def fn(x, t, cond=None, uc=None):
            times.append(float(torch.as_tensor(t).reshape(-1)[0]))
            return torch.zeros_like(x)

        with torch.no_grad():
            self._run(fn, torch.zeros(1, 1, dtype=torch.float64))
        return torch.tensor(times, dtype=torch.float64)

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, timesteps: Any = None,
                      sigmas: Any = None, mu: float | None = None, **_ignored) -> None:
        """The learned times; what the pipeline asks for (steps, timesteps, sigmas, mu) does not change them."""
        self._stop()
        self.timesteps = self.schedule.model_time(self._call_times).float().to(device)
        self.num_inference_steps = len(self.timesteps)
        self._step_index = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Pipelines call it before the loop; a learned schedule always starts at its first time."""
        if begin_index:
            raise ValueError("LD3Scheduler runs the learned schedule from its start (no img2img strength)")

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        return sample

    # ------------------------------------------------------------------ stepping
    def _eps(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The noise prediction from the pipeline's network output at (x, t)."""
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if self.config.prediction_type == "epsilon":
            return out.to(x.dtype)

        def col(v: Tensor) -> Tensor:  # one value per sample, broadcast over the rest
            return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim else v

        if self.config.prediction_type == "v_prediction":
            a, s = col(self.schedule.alpha(tt)), col(self.schedule.sigma(tt))
            return (a * out.to(x.dtype) + s * x) / (a * a + s * s)
        f, g = self.schedule.ode_coefficients(tt)  # flow: out = dx/dt = f x + g eps
        return (out.to(x.dtype) - col(f) * x) / col(g)

    def _start(self, sample: Tensor) -> None:
        self._to_solver: queue.Queue = queue.Queue()
        self._to_pipe: queue.Queue = queue.Queue()

        def model_fn(x, t, cond=None, uc=None):
            self._to_pipe.put(("call", x, t))
            eps = self._to_solver.get()
            if eps is None:
                raise _Stop
            return eps

        def work():
            try:
                with torch.no_grad():
                    self._to_pipe.put(("done", self._run(model_fn, sample), None))
            except _Stop:
                pass
            except BaseException as e:  # handed to the pipeline's thread
                self._to_pipe.put(("error", e, None))

        self._worker = threading.Thread(target=work, daemon=True, name="ld3-solver")
        self._worker.start()
        self._pending = self._next()  # the solver's first call: at the pipeline's first state

    def _next(self) -> tuple:
        kind, a, b = self._to_pipe.get()
        if kind == "error":
            raise a
        return kind, a, b

    def _stop(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            self._to_solver.put(None)
            self._worker.join(timeout=10)
        self._worker = None

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, return_dict: bool = True, **_ignored):
        """Hand the network's output at ``sample`` to the solver; the next state it calls the network at
        (or, after the last call, the solver's result)."""
        if self._step_index is None:
            self._start(sample)
            self._step_index = 0
        kind, x, t = self._pending
        if kind != "call":
            raise RuntimeError("LD3Scheduler.step called after the last network call of the learned schedule")
        self._to_solver.put(self._eps(model_output, x, t))
        self._pending = self._next()
        self._step_index += 1
        kind, nxt, _ = self._pending
        prev = nxt.to(sample.dtype)
        if kind == "done":
            self._worker = None
        return SchedulerOutput(prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)


def ld3_scheduler(run: str | Path | tuple, pipeline_scheduler: Any) -> LD3Scheduler:
    """An ``LD3Scheduler`` for a learned run (a run folder or its best_v2.pt; or ``(t, t', solver, order,
    options)``) on the noise schedule of ``pipeline_scheduler`` (the pipeline's own)."""
    schedule, pred = schedule_of(pipeline_scheduler)
    if isinstance(run, tuple):
        t, tp, solver, order, options = run
    else:
        from ld3.export import read_run, solver_options

        r = read_run(str(run), schedule, {"solver_name": "uni_pc"})
        t, tp, solver, order, options = r.t, r.tp, r.solver, r.order, solver_options(r.solver, r.run_cfg)
    kw: dict[str, Any] = {}
    if isinstance(schedule, VPDiscreteSchedule):
        kw = {"alphas_cumprod": [float(b) for b in schedule.alphas_cumprod], "num_train_timesteps": int(schedule.N)}
    return LD3Scheduler([float(v) for v in t], [float(v) for v in tp], solver, order, dict(options),
                        prediction_type=pred, schedule=schedule.name, **kw)


__all__ = ["LD3Scheduler", "ld3_scheduler", "schedule_of"]
