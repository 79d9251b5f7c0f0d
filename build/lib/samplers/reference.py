"""Deliberately plain reference solvers, to test the fast ones in ``samplers/solvers.py`` against.

Written straight from the papers' formulas, one loop each, scalar coefficients in Python floats,
nothing shared with ``solvers.py``. Slow and not differentiable in ``t``; for tests only.

- ``dpm_solver_pp_2m``: DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++: Fast Solver for
  Guided Sampling of Diffusion Probabilistic Models"), Algorithm 2.
- ``exponential_integrator_step``: one step of the multistep exponential integrator of any order
  in the data prediction, from its definition: interpolate the last k data predictions by a
  polynomial in lambda (Lagrange form) and integrate the exact solution formula with it by
  Gauss-Legendre quadrature. For k = 1 and 3 it is DPM-Solver++'s 1M and 3M step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _coefficients(schedule, t_i: float) -> tuple[float, float, float]:
    """alpha, sigma and lambda = log(alpha / sigma) at one time, as Python floats."""
    tt = torch.tensor(t_i, dtype=torch.float64)
    alpha = float(schedule.alpha(tt))
    sigma = float(schedule.sigma(tt))
    return alpha, sigma, math.log(alpha / sigma)


def _data_prediction(model_fn, x: Tensor, t_i: float, alpha: float, sigma: float) -> Tensor:
    t_batch = torch.full((x.shape[0],), t_i, dtype=x.dtype, device=x.device)
    eps = model_fn(x, t_batch, None, None)
    return (x - sigma * eps) / alpha


def dpm_solver_pp_2m(model_fn, schedule, x: Tensor, t: Tensor, lower_order_final: bool = True) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), network at the grid times.

    x~_{t_1} = (sigma_{t_1} / sigma_{t_0}) x~_{t_0} - alpha_{t_1} (e^{-h_1} - 1) x_theta(x~_{t_0}, t_0)
    for i = 2..M:
        h_i = lambda_{t_i} - lambda_{t_{i-1}},  r_i = h_{i-1} / h_i
        D_i = (1 + 1 / (2 r_i)) x_theta(x~_{t_{i-1}}, t_{i-1}) - 1 / (2 r_i) x_theta(x~_{t_{i-2}}, t_{i-2})
        x~_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x~_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
    With ``lower_order_final`` the last step (i = M, M >= 2) uses D_M = x_theta(x~_{t_{M-1}}, t_{M-1}).
    """
    times = [float(v) for v in t]
    steps = len(times) - 1
    previous_prediction = None
    previous_h = None
    for i in range(1, steps + 1):
        a_prev, s_prev, l_prev = _coefficients(schedule, times[i - 1])
        a_now, s_now, l_now = _coefficients(schedule, times[i])
        prediction = _data_prediction(model_fn, x, times[i - 1], a_prev, s_prev)
        h = l_now - l_prev
        first_order = i == 1 or (lower_order_final and i == steps)
        if first_order:
            d = prediction
        else:
            r = previous_h / h
            d = (1.0 + 1.0 / (2.0 * r)) * prediction - (1.0 / (2.0 * r)) * previous_prediction
        x = (s_now / s_prev) * x - a_now * (math.exp(-h) - 1.0) * d
        previous_prediction = prediction
        previous_h = h
    return x


def _lagrange_basis(nodes: list[float], j: int, lam: np.ndarray) -> np.ndarray:
    """The j-th Lagrange polynomial through ``nodes``, evaluated at ``lam``."""
    out = np.ones_like(lam)
    for m, node in enumerate(nodes):
        if m != j:
            out = out * (lam - node) / (nodes[j] - node)
    return out


def exponential_integrator_step(x: Tensor, predictions: list[Tensor], lambdas: list[float],
                                lambda_next: float, alpha_next: float, sigma_now: float, sigma_next: float,
                                quadrature_points: int = 40) -> Tensor:
    """One multistep exponential-integrator step of the data-prediction ODE, from its definition.

    Exact solution from x at lambdas[0] (the current point) to lambda_next:
        x_next = (sigma_next / sigma_now) x + sigma_next int e^{lambda} x_theta(lambda) dlambda.
    Replace x_theta by the polynomial through (lambdas[j], predictions[j]), j = 0..k-1 (current point
    first, then older ones), in Lagrange form l_j:
        x_next = (sigma_next / sigma_now) x + sum_j c_j predictions[j],
        c_j = alpha_next int_{lambdas[0]}^{lambda_next} e^{lambda - lambda_next} l_j(lambda) dlambda,
    the integral by Gauss-Legendre quadrature (exact to rounding for these smooth integrands).
    With k = 1 and k = 3 this is DPM-Solver++'s 1M and 3M step. (Its 2M step uses the simpler
    coefficient of Algorithm 2 below, which differs from the k = 2 integral at O(h^3).)
    """
    gauss_nodes, gauss_weights = np.polynomial.legendre.leggauss(quadrature_points)
    start = lambdas[0]
    half = 0.5 * (lambda_next - start)
    lam = start + half * (gauss_nodes + 1.0)
    new_x = (sigma_next / sigma_now) * x
    for j in range(len(predictions)):
        integrand = np.exp(lam - lambda_next) * _lagrange_basis(lambdas, j, lam)
        c_j = alpha_next * half * float(np.sum(gauss_weights * integrand))
        new_x = new_x + c_j * predictions[j]
    return new_x


__all__ = ["dpm_solver_pp_2m", "exponential_integrator_step"]
