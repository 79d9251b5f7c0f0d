"""LD3's learnable discretization: params1 -> times t, params2 -> decoupled network times t'.

The parameters mean what they mean in the paper's code (``discretize_model_wrapper``), so that a
``best_v2.pt`` moves between the tools. With s = softmax(params1) and the S intervals of the grid:

``lambda`` mode (pixel / EDM models): interval i (from t_i to t_{i+1}) gets the share
    s_{i+1} / (s_1 + ... + s_S) of lambda(t_min) - lambda(T) (params1[0] has no effect);
    lambda'_i = lambda_i + clamp(params2_i, -w, w) for 0 < i < S,  t_i = t(lambda_i), t'_i = t(lambda'_i).
``time`` mode (latent models): the same in t, with the shares in reverse order (the paper's code
    flips the cumulative sum): interval i gets s_{S-i} / (s_1 + ... + s_S) of T - t_min.
At initialization (params1 = 1, params2 = 0): logSNR-uniform (lambda) or time-uniform (time), t' = t.

The window w = win_rate * (smallest gap). ``window="schedule"`` (ours) measures the gap on the
schedule, in the learning variable. ``window="params"`` is the paper's code in lambda mode: the
smallest gap between neighbouring raw params1 numbers, which is 0 at initialization, so t' stays
equal to t until params1 have moved (in time mode the paper measures on the schedule, as ours).

``arithmetic="paper"`` computes the map as the paper's code does, in float32 with its operations
(softmax over all of params1, cumulative sum, min-max normalisation; end points from float32
lambdas), so that the rounding, and with it RMSprop's response to params1[0]'s rounding-level
gradient, is the paper's; ``"fast"`` (ours) computes the same map in float64 with exact end points.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ld3.samplers.schedules import NoiseSchedule

WINDOWS = ("schedule", "params")
ARITHMETICS = ("fast", "paper")


class LearnedDiscretization(nn.Module):
    def __init__(self, schedule: NoiseSchedule, steps: int, time_mode: str = "lambda", win_rate: float = 0.5,
                 window: str = "schedule", arithmetic: str = "fast"):
        super().__init__()
        if time_mode not in ("lambda", "time"):
            raise ValueError(f"time_mode must be 'lambda' or 'time', got {time_mode!r}")
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
        if arithmetic not in ARITHMETICS:
            raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
        self.schedule, self.steps, self.time_mode, self.win_rate = schedule, steps, time_mode, win_rate
        self.window, self.arithmetic = window, arithmetic
        dtype = torch.float32 if arithmetic == "paper" else torch.float64
        self.params1 = nn.Parameter(torch.ones(steps + 1, dtype=dtype))
        self.params2 = nn.Parameter(torch.zeros(steps + 1, dtype=dtype))
        ends = torch.tensor([schedule.T, schedule.t_min], dtype=torch.float64)
        self.register_buffer("ends", schedule.lambda_(ends) if time_mode == "lambda" else ends)
        self.register_buffer("t_ends", ends.clone(), persistent=False)  # exactly T and t_min
        # the paper's lambda_min = lambda(T), lambda_max = lambda(t_min), from float32 times, as Python floats
        lam32 = schedule.lambda_(torch.tensor([schedule.T, schedule.t_min], dtype=torch.float32))
        self._paper_lambdas = (float(lam32[0]), float(lam32[1]))

    def _to_t(self, v: Tensor) -> Tensor:
        return self.schedule.t_of_lambda(v) if self.time_mode == "lambda" else v

    def _from_t(self, t: Tensor) -> Tensor:
        return self.schedule.lambda_(t) if self.time_mode == "lambda" else t

    def shares(self) -> Tensor:
        """The S interval shares of the grid, in grid order (they sum to 1)."""
        s = torch.softmax(self.params1[1:], 0)
        return s if self.time_mode == "lambda" else s.flip(0)

    def grid(self) -> Tensor:
        """The monotone grid in the learning variable (lambda or t), from params1 (``fast`` arithmetic)."""
        u = torch.cumsum(self.shares(), 0)
        span = self.ends[1:] - self.ends[:1]
        return torch.cat([self.ends[:1], self.ends[:1] + u[:-1] * span, self.ends[1:]])

    def _window(self, v: Tensor) -> float | Tensor:
        with torch.no_grad():
            if self.window == "params" and self.time_mode == "lambda":
                return float((self.params1[1:] - self.params1[:-1]).abs().min()) * self.win_rate
            return self.win_rate * (v[1:] - v[:-1]).abs().min()

    def forward(self) -> tuple[Tensor, Tensor]:
        """(t, t'), each of length S + 1; end points never shifted."""
        if self.arithmetic == "paper":
            return self._paper_forward()
        v = self.grid()
        w = self._window(v)
        inner = v[1:-1]
        shifted = inner + torch.clamp(self.params2[1:-1], -w, w)
        t_in = self._to_t(torch.cat([inner, shifted]))  # one conversion for t and t'
        first, last = self.t_ends[:1], self.t_ends[1:]
        n = self.steps - 1
        return torch.cat([first, t_in[:n], last]), torch.cat([first, t_in[n:], last])

    def _paper_forward(self) -> tuple[Tensor, Tensor]:
        """The paper's ``discretize_model_wrapper``, operation for operation (float32)."""
        lam_lo, lam_hi = self._paper_lambdas  # lambda(T), lambda(t_min)
        p1, p2 = self.params1, self.params2
        mask = torch.ones_like(p1)
        mask[0] = 0.0
        mask[-1] = 0.0
        if self.time_mode == "lambda":
            cum = torch.cumsum(F.softmax(p1, dim=0), dim=0)
            normed = (cum - cum.min()) / (cum.max() - cum.min())
            lam1 = normed * (lam_hi - lam_lo) + lam_lo
            w = self._window(lam1)
            lam2 = lam1 + torch.clamp(p2, min=-w, max=w) * mask
            return self.schedule.t_of_lambda(lam1), self.schedule.t_of_lambda(lam2)
        t_max = self.schedule.t_of_lambda(torch.tensor(lam_lo, dtype=torch.float32)).to(p1.device)
        t_min = self.schedule.t_of_lambda(torch.tensor(lam_hi, dtype=torch.float32)).to(p1.device)
        cum = torch.cumsum(F.softmax(p1, dim=0), dim=0).flip(0)
        normed = (cum - cum[-1]) / (cum[0] - cum[-1])
        t1 = normed * (t_max - t_min) + t_min
        w = float((t1.detach()[1:] - t1.detach()[:-1]).abs().min()) * self.win_rate
        return t1, t1 + torch.clamp(p2, min=-w, max=w) * mask

    @torch.no_grad()
    def fit_to(self, t_target: Tensor) -> float:
        """Set params1 so that t matches ``t_target`` (used by --match_prior), in closed form: each interval's
        share of the span gives one softmax entry. Returns the largest error, in the learning variable."""
        v_target = self._from_t(t_target.to(torch.float64).to(self.ends.device))
        span = self.ends[1] - self.ends[0]
        u = ((v_target - self.ends[0]) / span).clamp(0, 1)
        du = (u[1:] - u[:-1]).clamp_min(1e-12)
        if self.time_mode == "time":
            du = du.flip(0)
        # softmax(p)[1:] proportional to du; p_0 is free (it cancels): keep it at log mean du.
        p = torch.cat([torch.log(du.mean()).reshape(1), torch.log(du)])
        self.params1.copy_(p.to(self.params1.dtype))
        t, _ = self()
        return float((self._from_t(t.double()) - v_target).abs().max())


def checkpoint_dict(disc: LearnedDiscretization) -> dict:
    """The paper's checkpoint format: params1, params2, best_t_steps = cat(t, t')."""
    with torch.no_grad():
        t, tp = disc()
    return {"params1": disc.params1.detach().cpu().clone(), "params2": disc.params2.detach().cpu().clone(),
            "best_t_steps": torch.cat([t, tp]).detach().cpu().clone()}


def times_from_checkpoint(ckpt: dict) -> tuple[Tensor, Tensor]:
    """(t, t') from a checkpoint dict in the paper's format, in the checkpoint's own dtype."""
    if not isinstance(ckpt, dict) or "best_t_steps" not in ckpt:
        raise ValueError("checkpoint has no 'best_t_steps' (expected keys params1, params2, best_t_steps)")
    ts = torch.as_tensor(ckpt["best_t_steps"]).reshape(-1)
    if not ts.is_floating_point():
        ts = ts.to(torch.float64)
    if ts.numel() % 2 or ts.numel() < 4:
        raise ValueError(f"best_t_steps has {ts.numel()} entries; expected 2 * (S + 1)")
    n = ts.numel() // 2
    t, tp = ts[:n], ts[n:]
    if not bool(torch.all(t[1:] < t[:-1])):
        raise ValueError("best_t_steps: the times t are not strictly decreasing")
    return t, tp


def load_learned_times(path: str | Path) -> tuple[Tensor, Tensor]:
    """The learned discretization of a run (``RUN/best_v2.pt``) as (t, t'), for use in Python.

    >>> t, t_prime = load_learned_times("logs/.../best_v2.pt")
    >>> x = solve("uni_pc", model.noise_fn, model.schedule, x_T, t, t_prime)
    """
    from ld3.io import safe_load

    return times_from_checkpoint(safe_load(Path(path), "checkpoint"))
