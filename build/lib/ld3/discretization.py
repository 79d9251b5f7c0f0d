"""LD3's learnable discretization: params1 -> times t, params2 -> decoupled network times t'.

``lambda`` mode (pixel / EDM models):
    u_0 = 0, u_i = cumsum(softmax(params1[1:]))_i   (the paper's cumsum(softmax(params1)) rescaled
                                                     to (u - u_0) / (u_S - u_0): the same map)
    lambda_i = lambda(T) + u_i (lambda(t_min) - lambda(T)),  t_i = t(lambda_i)
    lambda'_i = lambda_i + clamp(params2_i, -w, w) for 0 < i < S,  t'_i = t(lambda'_i)
    w = win_rate * min_i |lambda_{i+1} - lambda_i|  (no gradient through w)
``time`` mode (latent models): the same map directly in t (T -> t_min).
At initialization (params1 = 1, params2 = 0): logSNR-uniform (lambda) or time-uniform (time), t' = t.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from samplers.schedules import NoiseSchedule


class LearnedDiscretization(nn.Module):
    def __init__(self, schedule: NoiseSchedule, steps: int, time_mode: str = "lambda", win_rate: float = 0.5,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        if time_mode not in ("lambda", "time"):
            raise ValueError(f"time_mode must be 'lambda' or 'time', got {time_mode!r}")
        self.schedule, self.steps, self.time_mode, self.win_rate = schedule, steps, time_mode, win_rate
        self.params1 = nn.Parameter(torch.ones(steps + 1, dtype=dtype))
        self.params2 = nn.Parameter(torch.zeros(steps + 1, dtype=dtype))
        ends = torch.tensor([schedule.T, schedule.t_min], dtype=dtype)
        self.register_buffer("ends", schedule.lambda_(ends) if time_mode == "lambda" else ends)
        self.register_buffer("t_ends", ends.clone(), persistent=False)  # exactly T and t_min

    def _to_t(self, v: Tensor) -> Tensor:
        return self.schedule.t_of_lambda(v) if self.time_mode == "lambda" else v

    def _from_t(self, t: Tensor) -> Tensor:
        return self.schedule.lambda_(t) if self.time_mode == "lambda" else t

    def grid(self) -> Tensor:
        """The monotone grid in the learning variable (lambda or t), from params1.

        The paper's u = cumsum(softmax(params1)), rescaled to (u - u_0) / (u_S - u_0), gives interval i
        the share softmax(params1)_i / sum_{j >= 1} softmax(params1)_j = softmax(params1[1:])_i:
        computed so (params1[0] has no effect, there as here), with the end points set exactly.
        """
        u = torch.cumsum(torch.softmax(self.params1[1:], 0), 0)
        span = self.ends[1:] - self.ends[:1]
        return torch.cat([self.ends[:1], self.ends[:1] + u[:-1] * span, self.ends[1:]])

    def forward(self) -> tuple[Tensor, Tensor]:
        """(t, t'), each of length S + 1; end points exactly T and t_min, never shifted."""
        v = self.grid()
        with torch.no_grad():
            w = self.win_rate * (v[1:] - v[:-1]).abs().min()
        inner = v[1:-1]
        shifted = inner + torch.clamp(self.params2[1:-1], -w, w)
        t_in = self._to_t(torch.cat([inner, shifted]))  # one conversion for t and t'
        first, last = self.t_ends[:1], self.t_ends[1:]
        n = self.steps - 1
        return torch.cat([first, t_in[:n], last]), torch.cat([first, t_in[n:], last])

    @torch.no_grad()
    def fit_to(self, t_target: Tensor, iters: int = 2000, lr: float = 0.05) -> float:
        """Set params1 so that t matches ``t_target`` (used by --match_prior). Returns the final error."""
        v_target = self._from_t(t_target.to(self.ends.dtype))
        span = self.ends[1] - self.ends[0]
        u = ((v_target - self.ends[0]) / span).clamp(0, 1)
        du = (u[1:] - u[:-1]).clamp_min(1e-12)
        # softmax(p)[1:] proportional to du; p_0 is free (it cancels after rescaling): keep it at log mean du.
        p = torch.cat([torch.log(du.mean()).reshape(1), torch.log(du)])
        self.params1.copy_(p)
        return float((self.grid() - v_target).abs().max())


def checkpoint_dict(disc: LearnedDiscretization) -> dict:
    """The paper's checkpoint format: params1, params2, best_t_steps = cat(t, t')."""
    with torch.no_grad():
        t, tp = disc()
    return {"params1": disc.params1.detach().cpu().clone(), "params2": disc.params2.detach().cpu().clone(),
            "best_t_steps": torch.cat([t, tp]).detach().cpu().clone()}


def times_from_checkpoint(ckpt: dict) -> tuple[Tensor, Tensor]:
    """(t, t') from a checkpoint dict in the paper's format."""
    if not isinstance(ckpt, dict) or "best_t_steps" not in ckpt:
        raise ValueError("checkpoint has no 'best_t_steps' (expected keys params1, params2, best_t_steps)")
    ts = torch.as_tensor(ckpt["best_t_steps"], dtype=torch.float64).reshape(-1)
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
