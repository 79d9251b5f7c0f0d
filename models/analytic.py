"""Diffusion models with closed-form denoisers: a Gaussian and a Gaussian mixture.

Both return noise predictions eps(x, t) exactly as a trained network wrapper would, for any
noise schedule, so every solver and the whole LD3 pipeline can run on them, and the
Gaussian's probability-flow ODE has a closed-form solution to test against.

Forward process x_t = alpha x_0 + sigma eps. For x_0 ~ N(mu, diag(s^2)):
  x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2),  eps(x, t) = sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2),
and the ODE keeps (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) constant.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ld3.models.base import Model
from ld3.samplers.schedules import FlowSchedule, NoiseSchedule, VESchedule, VPDiscreteSchedule


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        return v
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class GaussianNoise(nn.Module):
    """Exact noise prediction for x_0 ~ N(mu, diag(std^2)), mu and std of the latent's shape."""

    def __init__(self, schedule: NoiseSchedule, mu: Tensor, std: Tensor):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("mu", mu.to(torch.float64))
        self.register_buffer("std", std.to(torch.float64))

    def forward(self, x: Tensor, t: Tensor, cond: Any = None, uc: Any = None) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        a, s = _bcast(self.schedule.alpha(t), x), _bcast(self.schedule.sigma(t), x)
        mu, std = self.mu.to(x.dtype), self.std.to(x.dtype)
        return s * (x - a * mu) / (a**2 * std**2 + s**2)

    def exact_solution(self, x_T: Tensor, t_from: float, t_to: float | Tensor) -> Tensor:
        """x at ``t_to`` on the ODE trajectory through x_T at ``t_from``."""
        sch = self.schedule
        tf = torch.as_tensor(t_from, dtype=x_T.dtype)
        tt = torch.as_tensor(t_to, dtype=x_T.dtype)
        mu, std = self.mu.to(x_T.dtype), self.std.to(x_T.dtype)
        af, sf = sch.alpha(tf), sch.sigma(tf)
        at, st = sch.alpha(tt), sch.sigma(tt)
        z = (x_T - af * mu) / torch.sqrt(af**2 * std**2 + sf**2)
        return at * mu + torch.sqrt(at**2 * std**2 + st**2) * z


def _one_time(t: Tensor) -> bool:
    """Whether ``t`` holds one time for the whole batch. A scalar, or one expanded (stride 0, as the solvers pass
    it): decided from the layout, without reading the values (no wait on a GPU). Equal values in separate entries
    count only without a gradient, since each entry then needs its own."""
    if t.numel() == 1 or all(st == 0 for st in t.stride()):
        return True
    return not t.requires_grad and bool((t == t.reshape(-1)[0]).all())


class GMMNoise(nn.Module):
    """Exact noise prediction for a diagonal Gaussian mixture sum_k pi_k N(mu_k, diag(var_k)).

    Given x_t, component k has likelihood N(x; alpha mu_k, alpha^2 var_k + sigma^2) and
    denoiser E[x_0 | x_t, k] = mu_k + alpha var_k (x - alpha mu_k) / (alpha^2 var_k + sigma^2);
    D(x) = sum_k w_k(x) E[x_0 | x_t, k] with posterior weights w_k; eps = (x - alpha D) / sigma.
    Computed in float64 whatever the input dtype.
    """

    def __init__(self, schedule: NoiseSchedule, weights: Tensor, means: Tensor, variances: Tensor,
                 shape: tuple[int, ...]):
        super().__init__()
        self.schedule = schedule
        self.shape = tuple(shape)
        self.register_buffer("log_w", torch.log(weights.to(torch.float64)))
        self.register_buffer("means", means.to(torch.float64))  # K x D
        self.register_buffer("variances", variances.to(torch.float64))  # K x D

    def denoise(self, x: Tensor, t: Tensor, one_time: bool | None = None) -> Tensor:
        """D(x_t) = E[x_0 | x_t] at a time per sample (or one for the batch: ``one_time``, found from t if None),
        in float64, returned in x's dtype."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        t = torch.as_tensor(t, device=x.device)
        if _one_time(t) if one_time is None else one_time:
            d = self._denoise_shared(xf, t.reshape(-1)[0].to(torch.float64))
        else:
            d = self._denoise_each(xf, t.to(torch.float64))
        return d.reshape(x.shape).to(x.dtype)

    def _denoise_each(self, xf: Tensor, t: Tensor) -> Tensor:
        """``denoise`` with a time per sample (B x K x D intermediates)."""
        a = self.schedule.alpha(t).reshape(-1, 1, 1)
        s = self.schedule.sigma(t).reshape(-1, 1, 1)
        var_t = a**2 * self.variances + s**2  # B x K x D
        diff = xf[:, None, :] - a * self.means  # B x K x D
        logp = -0.5 * ((diff**2) / var_t + torch.log(2 * math.pi * var_t)).sum(-1) + self.log_w
        w = torch.softmax(logp, dim=1)  # B x K
        post = self.means + a * self.variances * diff / var_t  # B x K x D
        return (w[:, :, None] * post).sum(1)

    def _denoise_shared(self, xf: Tensor, t: Tensor) -> Tensor:
        """``denoise`` at one time for the whole batch, by matrix products: nothing of size B x K x D is formed.
        With v_t = alpha^2 var + sigma^2, sum_d (x - alpha mu)^2 / v_t = x^2 . (1/v_t) - 2 alpha x . (mu/v_t)
        + alpha^2 mu^2 . (1/v_t), and E[x_0 | x_t, k] = sigma^2 mu / v_t + x alpha var / v_t."""
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        inv = 1.0 / (a**2 * self.variances + s**2)  # K x D
        mu_inv = self.means * inv
        const = (a**2 * self.means * mu_inv - torch.log(inv / (2 * math.pi))).sum(-1)  # K
        quad = (xf * xf) @ inv.T - (2 * a) * (xf @ mu_inv.T) + const  # B x K
        w = torch.softmax(self.log_w - 0.5 * quad, dim=1)
        return w @ (s**2 * mu_inv) + xf * (w @ (a * self.variances * inv))

    def forward(self, x: Tensor, t: Tensor, cond: Any = None, uc: Any = None) -> Tensor:
        one = _one_time(torch.as_tensor(t))  # before the dtype changes: the copy loses an expanded (stride 0) layout
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        d = self.denoise(x, t, one)
        a, s = _bcast(self.schedule.alpha(t), x), _bcast(self.schedule.sigma(t), x)
        return (x - a * d) / s

    @torch.no_grad()
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[k] + self.variances[k].sqrt() * z).reshape(n, *self.shape)


def make_schedule(kind: str) -> NoiseSchedule:
    if kind in ("ve", "edm"):
        return VESchedule()
    if kind == "vp_discrete":
        return VPDiscreteSchedule.linear(1000)
    if kind == "flow":
        return FlowSchedule()
    raise ValueError(f"unknown schedule {kind!r} for an analytic model; choose ve, vp_discrete or flow")


def gaussian_model(schedule: str | NoiseSchedule = "ve", shape: tuple[int, ...] = (1, 8, 8),
                   seed: int = 0) -> Model:
    """A Gaussian data distribution with random mean and per-pixel std (deterministic by seed)."""
    sch = make_schedule(schedule) if isinstance(schedule, str) else schedule
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    std = 0.05 + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    net = GaussianNoise(sch, mu, std)
    return Model(name="gaussian", noise_fn=net, schedule=sch, latent_shape=tuple(shape), net=net,
                 time_mode="lambda" if sch.name == "ve" else "time")


def load_digits_array() -> np.ndarray:
    """The 1797 scikit-learn 8x8 digits, scaled to [-1, 1], shape N x 1 x 8 x 8, and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float64) / 8.0 - 1.0
    return x[:, None], d.target


def fit_digits_gmm(n_components: int = 40, seed: int = 0, min_var: float = 1e-3) -> tuple[Tensor, Tensor, Tensor]:
    """Fit a diagonal GMM to the digits (k-means init, EM; deterministic for a seed)."""
    from sklearn.mixture import GaussianMixture

    x, _ = load_digits_array()
    gm = GaussianMixture(n_components=n_components, covariance_type="diag", random_state=seed,
                         reg_covar=min_var, max_iter=200)
    gm.fit(x.reshape(len(x), -1))
    return (torch.as_tensor(gm.weights_), torch.as_tensor(gm.means_), torch.as_tensor(gm.covariances_))


_GMM_CACHE: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}


def _cached_fit(n_components: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``fit_digits_gmm``, cached on disk (EM takes seconds; the fit is deterministic per sklearn version)."""
    import os
    from importlib.metadata import version

    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ld3"
    path = root / f"digits_gmm_k{n_components}_s{seed}_sklearn{version('scikit-learn')}.pt"
    try:
        d = torch.load(path, weights_only=True)
        return d["weights"], d["means"], d["variances"]
    except (OSError, KeyError, RuntimeError, EOFError, ValueError):
        pass
    w, m, v = fit_digits_gmm(n_components, seed)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"weights": w, "means": m, "variances": v}, tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # read-only home: fit again next time
    return w, m, v


def digits_gmm_model(schedule: str | NoiseSchedule = "ve", n_components: int = 40, seed: int = 0) -> Model:
    """Gaussian mixture fitted to the scikit-learn digits, exact denoiser, 1 x 8 x 8."""
    sch = make_schedule(schedule) if isinstance(schedule, str) else schedule
    key = (n_components, seed)
    if key not in _GMM_CACHE:
        _GMM_CACHE[key] = _cached_fit(n_components, seed)
    w, m, v = _GMM_CACHE[key]
    net = GMMNoise(sch, w, m, v, (1, 8, 8))
    return Model(name="digits_gmm", noise_fn=net, schedule=sch, latent_shape=(1, 8, 8), net=net,
                 time_mode="lambda" if sch.name == "ve" else "time",
                 info={"n_components": n_components, "seed": seed, "dataset": "digits"})


class GMMDenoiser(nn.Module):
    """The exact denoiser D(x, sigma) of a diagonal mixture on the VE (EDM) schedule, called like EDM's
    ``EDMPrecond``: computed in float64, returned in float32 (``out_dtype``) as a network would.

    D(x, sigma) = sum_k w_k [mu_k + var_k / (var_k + sigma^2) (x - mu_k)],
    w_k proportional to pi_k N(x; mu_k, diag(var_k + sigma^2)).
    The operations are those of the reference harness the paper's code was run with
    (``shared/paper_reference/scripts/gmm_diag.py``), so that rollouts, and their gradients, round alike.
    """

    def __init__(self, weights: Tensor, means: Tensor, variances: Tensor, shape: tuple[int, ...] = (1, 8, 8),
                 out_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("log_pi", torch.log(torch.as_tensor(weights, dtype=torch.float64)))
        self.register_buffer("mu", torch.as_tensor(means, dtype=torch.float64))
        self.register_buffer("var0", torch.as_tensor(variances, dtype=torch.float64))
        self.shape, self.out_dtype = tuple(shape), out_dtype
        self.img_channels, self.img_resolution = shape[0], shape[-1]

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Any = None) -> Tensor:
        n = x.shape[0]
        xf = x.reshape(n, -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(n)
        var = self.var0[None] + sigma.pow(2)[:, None, None]  # n x K x D
        diff = xf[:, None, :] - self.mu[None]
        logp = -0.5 * (diff.pow(2) / var + torch.log(2 * math.pi * var)).sum(-1) + self.log_pi[None]
        w = torch.softmax(logp, dim=1)
        d = (w[..., None] * (self.mu[None] + self.var0[None] / var * diff)).sum(1)
        return d.reshape(x.shape).to(self.out_dtype)


def gmm_model_from_file(path: str | Path, schedule: str | NoiseSchedule = "ve") -> Model:
    """A diagonal Gaussian mixture saved as a dict of tensors ``weights`` [K], ``means`` [K, D],
    ``variances`` [K, D] (and optionally ``shape``), e.g. ``tests/data/paper_reference/gmm_digits_diag40.pt``,
    the mixture the paper's code was run on (no scikit-learn fit)."""
    sch = make_schedule(schedule) if isinstance(schedule, str) else schedule
    d = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(d, dict) or not all(k in d for k in ("weights", "means", "variances")):
        raise ValueError(f"{path} is not a mixture file (needs tensors weights, means, variances)")
    w, m, v = (torch.as_tensor(d[k], dtype=torch.float64) for k in ("weights", "means", "variances"))
    if m.ndim != 2 or v.shape != m.shape or w.shape != (m.shape[0],):
        raise ValueError(f"{path}: weights [K], means and variances [K, D] expected, got {tuple(w.shape)}, "
                         f"{tuple(m.shape)}, {tuple(v.shape)}")
    shape = tuple(int(x) for x in d.get("shape", (1, 8, 8)))
    if math.prod(shape) != m.shape[1]:
        raise ValueError(f"{path}: shape {shape} does not hold {m.shape[1]} dimensions")
    info = {"n_components": int(w.numel()), "ckp_path": str(path), "dataset": "digits"}
    if sch.name == "ve":  # as an EDM network: float32 denoiser output, noise prediction by EDM's wrapper
        from ld3.models.base import edm_model

        model = edm_model("digits_gmm", GMMDenoiser(w, m, v, shape), shape, info=info)
        model.time_mode = "lambda"
        return model
    net = GMMNoise(sch, w, m, v, shape)
    return Model(name="digits_gmm", noise_fn=net, schedule=sch, latent_shape=shape, net=net, time_mode="time",
                 info=info)

