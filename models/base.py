"""The one record every model loader returns, and the EDM wrapper shared by pixel models."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ld3.errors import UserError
from ld3.samplers.schedules import NoiseSchedule, VESchedule


class ModelError(UserError):
    """A model cannot be built from the given configuration (bad path, bad name): a user mistake, one line
    and exit status 2 wherever it surfaces (also after loading, e.g. missing prompts)."""


# model_fn(x, t, cond, uc) -> noise prediction eps, same shape as x; t is the schedule's
# continuous time, a scalar tensor or one value per sample.
NoiseFn = Callable[[Tensor, Tensor, Any, Any], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


def index_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """Generator of sample ``index``: what it draws depends on (seed, index, stream) only.

    torch's CPU generator keeps only 32 bits of its seed, so the triple is hashed to 32 bits.
    """
    digest = hashlib.blake2b(f"ld3:{int(seed)}:{int(stream)}:{int(index)}".encode(), digest_size=4).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _no_condition(indices: Sequence[int], seed: int = 0, device: Any = None, balanced: bool = False) -> tuple[Any, Any]:
    return None, None


@dataclass
class Model:
    """What the rest of the tool knows about a diffusion model.

    - ``noise_fn(x, t, cond, uc)``: noise prediction at schedule time ``t`` (guidance, if
      any, already applied using ``uc``).
    - ``schedule``: the noise schedule; ``prior`` turns unit noise into ``x_T``.
    - ``latent_shape``: C, H, W of the state the solvers integrate.
    - ``decode(latent) -> image in [-1, 1]`` (identity for pixel models).
    - ``conditions(indices, seed, device, balanced=False) -> (cond, uc)``, one row per sample
      index, drawn from the index alone (None, None when unconditional); ``balanced``: classes
      uniform over indices (evaluation).
    - ``time_mode``: 'lambda' (pixel/EDM) or 'time' (latent) parameterization of LD3.
    - ``net``: the underlying ``nn.Module`` if any (for checkpointing, device moves).
    """

    name: str
    noise_fn: NoiseFn
    schedule: NoiseSchedule
    latent_shape: tuple[int, ...]
    decode: Callable[[Tensor], Tensor] = _identity
    conditions: Callable[..., tuple[Any, Any]] = _no_condition
    time_mode: str = "lambda"
    net: nn.Module | None = None
    info: dict = field(default_factory=dict)


class EDMNoise(nn.Module):
    """Noise prediction from an EDM denoiser ``D(x, sigma, class_labels)``.

    For the VE schedule (alpha = 1, sigma = t): eps = (x - D(x, sigma)) / sigma.
    """

    def __init__(self, denoiser: nn.Module, label_dim: int = 0):
        super().__init__()
        self.denoiser = denoiser
        self.label_dim = label_dim

    def forward(self, x: Tensor, t: Tensor, cond: Any = None, uc: Any = None) -> Tensor:
        """eps = (x - D(x, sigma)) / sigma in x's dtype. A sigma narrower than x (float32 times, float64 states:
        the paper's arithmetic) is passed on as it is, as the paper's EDM wrapper does."""
        sigma = torch.as_tensor(t, device=x.device)
        if not sigma.is_floating_point() or torch.promote_types(sigma.dtype, x.dtype) != x.dtype:
            sigma = sigma.to(x.dtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.reshape(-1)
        d = self.denoiser(x, sigma, cond)
        return (x - d.to(x.dtype)) / sigma.reshape(-1, *([1] * (x.ndim - 1)))


def velocity_noise_fn(velocity_fn: Callable[..., Tensor], schedule: NoiseSchedule) -> NoiseFn:
    """A noise prediction from a model of the velocity v = dx/dt along x_t = alpha x_0 + sigma eps
    (rectified flow: v = eps - x_0): eps = (v - f(t) x) / g(t), with (f, g) the schedule's
    probability-flow coefficients. Every solver then runs on it unchanged."""

    def noise_fn(x: Tensor, t: Tensor, cond: Any = None, uc: Any = None) -> Tensor:
        v = velocity_fn(x, t, cond, uc)
        f, g = schedule.ode_coefficients(torch.as_tensor(t, dtype=x.dtype, device=x.device))
        shape = (-1,) + (1,) * (x.ndim - 1)
        f = f.reshape(shape) if f.ndim else f
        g = g.reshape(shape) if g.ndim else g
        return (v.to(x.dtype) - f * x) / g

    return noise_fn


def eps_from_v(v: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The noise prediction of a v-prediction (Salimans & Ho: v = alpha eps - sigma x_0, SD 2.x's
    ``prediction_type: v_prediction``) at x = alpha x_0 + sigma eps: eps = (alpha v + sigma x) / (alpha^2 + sigma^2)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    a = alpha.reshape(shape) if alpha.ndim else alpha
    s = sigma.reshape(shape) if sigma.ndim else sigma
    return (a * v.to(x.dtype) + s * x) / (a * a + s * s)


def vprediction_noise_fn(v_fn: Callable[..., Tensor], schedule: NoiseSchedule) -> NoiseFn:
    """A noise prediction from a v-prediction model ``v_fn(x, t, cond, uc)`` (see :func:`eps_from_v`)."""

    def noise_fn(x: Tensor, t: Tensor, cond: Any = None, uc: Any = None) -> Tensor:
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return eps_from_v(v_fn(x, t, cond, uc), x, schedule.alpha(tt), schedule.sigma(tt))

    return noise_fn


def edm_model(name: str, denoiser: nn.Module, img_shape: tuple[int, int, int], label_dim: int = 0,
              sigma_min: float = 0.002, sigma_max: float = 80.0, info: dict | None = None) -> Model:
    """Wrap an EDM denoiser ``D(x, sigma, class_labels)`` as a ``Model`` on the VE schedule."""
    wrapper = EDMNoise(denoiser, label_dim)

    def conditions(indices: Sequence[int], seed: int = 0, device: Any = None, balanced: bool = False):
        """One-hot labels: drawn per sample index, or ``index % label_dim`` when ``balanced`` (evaluation)."""
        if not label_dim:
            return None, None
        idx = [i % label_dim if balanced else
               int(torch.randint(label_dim, (1,), generator=index_generator(seed, i, stream=1))) for i in indices]
        return torch.eye(label_dim)[idx].to(device), None

    return Model(name=name, noise_fn=wrapper, schedule=VESchedule(sigma_min, sigma_max),
                 latent_shape=tuple(img_shape), conditions=conditions, time_mode="lambda",
                 net=wrapper, info=dict(info or {}))
