"""Noise schedules of diffusion models.

A schedule describes the forward process ``x_t = alpha(t) x_0 + sigma(t) eps`` through
``alpha(t)``, ``sigma(t)``, the half log-SNR ``lambda(t) = log alpha(t) - log sigma(t)``
and its inverse ``t(lambda)``, on ``[t_min, T]``. ``prior(z)`` turns unit Gaussian noise
into ``x_T``; ``model_time(t)`` is the time input the network was trained with.

All functions are pure tensor functions: batched, differentiable, on any dtype/device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _as_tensor(t: Tensor | float, like: Tensor | None = None) -> Tensor:
    if isinstance(t, Tensor):
        return t
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    return torch.as_tensor(t, dtype=dtype)


class NoiseSchedule:
    """Base class. Subclasses implement ``log_alpha`` and ``t_of_lambda``."""

    name: str = "base"
    baselines: tuple[str, ...] = ()  # hand-made grids usual for this schedule, besides the paper's four
    T: float
    t_min: float

    def log_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        """Inverse of ``lambda_``."""
        raise NotImplementedError

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(_as_tensor(t)))

    def sigma(self, t: Tensor) -> Tensor:
        """sigma = sqrt(1 - alpha^2) for VP schedules (overridden by VE)."""
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(_as_tensor(t))))

    def lambda_(self, t: Tensor) -> Tensor:
        """Half log-SNR: log alpha - log sigma."""
        t = _as_tensor(t)
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def edm_sigma(self, t: Tensor) -> Tensor:
        """EDM noise level sigma/alpha = exp(-lambda)."""
        return torch.exp(-self.lambda_(t))

    def t_of_edm_sigma(self, s: Tensor) -> Tensor:
        return self.t_of_lambda(-torch.log(_as_tensor(s)))

    def prior(self, z: Tensor) -> Tensor:
        """x_T from unit Gaussian noise."""
        return z

    def model_time(self, t: Tensor) -> Tensor:
        """Time input of the network (continuous ``t`` by default)."""
        return t

    def ode_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(f, g) with dx/dt = f(t) x + g(t) eps(x, t) (probability-flow ODE).

        From x = alpha x0 + sigma eps: f = d log(alpha)/dt, g = d sigma/dt - sigma f.
        """
        t = _as_tensor(t)
        with torch.enable_grad():
            tt = t if t.requires_grad else t.detach().requires_grad_(True)
            la = self.log_alpha(tt)
            sig = self.sigma(tt)
            f = torch.autograd.grad(la.sum(), tt, create_graph=t.requires_grad)[0]
            dsig = torch.autograd.grad(sig.sum(), tt, create_graph=t.requires_grad)[0]
        if not t.requires_grad:  # sig hangs on the private leaf tt: do not hand that graph out
            sig = sig.detach()
        return f, dsig - sig * f

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T}, t_min={self.t_min})"


class VESchedule(NoiseSchedule):
    """Variance exploding / EDM: alpha = 1, sigma = t, lambda = -log t, x_T = T z."""

    name = "ve"
    baselines = ("gits",)  # GITS's tables are EDM sigmas

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_min = float(sigma_min)
        self.T = float(sigma_max)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t: Tensor) -> Tensor:
        return _as_tensor(t)

    def lambda_(self, t: Tensor) -> Tensor:
        return -torch.log(_as_tensor(t))

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        return torch.exp(-_as_tensor(lam))

    def prior(self, z: Tensor) -> Tensor:
        return self.T * z

    def ode_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _as_tensor(t)
        return torch.zeros_like(t), torch.ones_like(t)


class FlowSchedule(NoiseSchedule):
    """Rectified flow (Stable Diffusion 3, Flux, SANA): x_t = (1 - t) x_0 + t eps.

    alpha = 1 - t, sigma = t, lambda = log((1 - t) / t), t(lambda) = 1 / (1 + e^lambda); the
    network's time input is ``num_train_timesteps * t`` (diffusers' ``timestep = sigma * 1000``).
    The schedule stops short of t = 1, where lambda = -inf: ``T`` defaults to 0.999 and the prior is
    ``sigma(T) z`` (it leaves out alpha(T) x_0, 1e-3 of the data, as VP priors leave out theirs). A
    model that predicts the velocity v = dx/dt = eps - x_0 is turned into a noise prediction by
    ``ld3.models.base.velocity_noise_fn``. SD3's and Flux's shifts are discretizations
    (``samplers.discretizations.flow_shift``), not schedules: they change where the steps go, not
    the model.
    """

    name = "flow"
    # SD3's shifted grid, the usual choice for rectified-flow models, and the EDM (Karras) grid in sigma / alpha
    baselines = ("sd3_shift", "karras")

    def __init__(self, t_min: float = 1e-3, T: float = 0.999, num_train_timesteps: int = 1000):
        if not 0.0 < t_min < T < 1.0:
            raise ValueError(f"FlowSchedule needs 0 < t_min < T < 1, got t_min={t_min}, T={T}")
        self.t_min, self.T, self.N = float(t_min), float(T), int(num_train_timesteps)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-_as_tensor(t))

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - _as_tensor(t)

    def sigma(self, t: Tensor) -> Tensor:
        return _as_tensor(t)

    def lambda_(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return torch.log1p(-t) - torch.log(t)

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(-_as_tensor(lam))

    def prior(self, z: Tensor) -> Tensor:
        return self.T * z

    def model_time(self, t: Tensor) -> Tensor:
        return self.N * _as_tensor(t)

    def ode_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """dx/dt = f x + g eps with f = -1 / (1 - t), g = 1 / (1 - t)."""
        t = _as_tensor(t)
        return -1.0 / (1.0 - t), 1.0 / (1.0 - t)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation with linear extrapolation; xp increasing.

    Differentiable in ``x``. Matches DPM-Solver's ``interpolate_fn``.
    """
    xp = xp.to(device=x.device, dtype=x.dtype)
    fp = fp.to(device=x.device, dtype=x.dtype)
    idx = torch.searchsorted(xp, x.detach().contiguous(), right=False)
    idx = idx.clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class VPDiscreteSchedule(NoiseSchedule):
    """Discrete-time VP (DDPM / latent diffusion) from ``alphas_cumprod`` of N steps.

    Continuous time ``t_n = n / N`` for step n = 1..N; log alpha(t) is the piecewise-linear
    interpolation of 0.5 log(alphas_cumprod[n-1]) at ``t_n`` (as DPM-Solver). t lies in
    [1/N, 1]; the network's time input is ``N (t - 1/N)`` in [0, N-1].
    """

    name = "vp_discrete"

    def __init__(self, alphas_cumprod: Tensor | None = None, betas: Tensor | None = None):
        if alphas_cumprod is None:
            if betas is None:
                raise ValueError("give alphas_cumprod or betas")
            alphas_cumprod = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), 0)
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.N = int(ac.numel())
        self.alphas_cumprod = ac
        self.t_array = torch.linspace(0.0, 1.0, self.N + 1, dtype=torch.float64)[1:]
        self.log_alpha_array = 0.5 * torch.log(ac)
        self.T = 1.0
        self.t_min = 1.0 / self.N

    @classmethod
    def linear(cls, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        """The 'scaled linear' betas of latent / Stable Diffusion."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        return cls(betas=betas)

    def log_alpha(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return _interp(t.reshape(-1), self.t_array, self.log_alpha_array).reshape(t.shape)

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        lam = _as_tensor(lam)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        flat = log_alpha.reshape(-1)
        t = _interp(flat, torch.flip(self.log_alpha_array, [0]), torch.flip(self.t_array, [0]))
        return t.reshape(lam.shape)

    def model_time(self, t: Tensor) -> Tensor:
        return (t - 1.0 / self.N) * self.N


class VPLinearSchedule(NoiseSchedule):
    """Continuous VP with linear beta(t) = beta_0 + t (beta_1 - beta_0) (score SDE)."""

    name = "vp_linear"

    def __init__(self, beta_0: float = 0.1, beta_1: float = 20.0, T: float = 1.0, t_min: float = 1e-3):
        self.beta_0, self.beta_1 = float(beta_0), float(beta_1)
        self.T, self.t_min = float(T), float(t_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        lam = _as_tensor(lam)
        tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        delta = self.beta_0**2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)

    def model_time(self, t: Tensor) -> Tensor:
        return 999.0 * t


class VPCosineSchedule(NoiseSchedule):
    """Continuous VP with the cosine schedule of improved DDPM (s = 0.008)."""

    name = "vp_cosine"

    def __init__(self, s: float = 0.008, T: float = 0.9946, t_min: float = 1e-3):
        self.s = float(s)
        self.T, self.t_min = float(T), float(t_min)
        self._log_alpha_0 = math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))

    def log_alpha(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return torch.log(torch.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self._log_alpha_0

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        lam = _as_tensor(lam)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        return torch.arccos(torch.exp(log_alpha + self._log_alpha_0)) * 2.0 * (1.0 + self.s) / math.pi - self.s

    def model_time(self, t: Tensor) -> Tensor:
        return 999.0 * t


SCHEDULES = {
    "ve": VESchedule,
    "edm": VESchedule,
    "vp_discrete": VPDiscreteSchedule,
    "vp_linear": VPLinearSchedule,
    "vp_cosine": VPCosineSchedule,
    "flow": FlowSchedule,
}
