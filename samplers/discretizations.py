"""Hand-made (baseline) discretizations: S + 1 strictly decreasing times from T to t_min."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ld3.samplers.schedules import NoiseSchedule


def _finish(t: Tensor, schedule: NoiseSchedule) -> Tensor:
    t = t.clone()
    t[0], t[-1] = schedule.T, schedule.t_min
    return t


def time_uniform(schedule: NoiseSchedule, steps: int, dtype=torch.float64) -> Tensor:
    """t uniform from T to t_min."""
    return _finish(torch.linspace(schedule.T, schedule.t_min, steps + 1, dtype=dtype), schedule)


def time_quadratic(schedule: NoiseSchedule, steps: int, dtype=torch.float64) -> Tensor:
    """The paper's 'time_quadratic': t_i = t_min + (T - t_min) ((S - i) / S)^2 (quadratic in the step index).

    (NFE 4 on EDM's [0.002, 80]: 80, 45.0009, 20.0015, 5.0019, 0.002.) DPM-Solver's time_quadratic,
    sqrt(t) uniform, is ``time_sqrt``.
    """
    u = ((steps - torch.arange(steps + 1, dtype=dtype)) / steps) ** 2
    return _finish(schedule.t_min + (schedule.T - schedule.t_min) * u, schedule)


def time_sqrt(schedule: NoiseSchedule, steps: int, dtype=torch.float64) -> Tensor:
    """sqrt(t) uniform from T to t_min (DPM-Solver's 'time_quadratic'; the paper's trainer plots it)."""
    s = torch.linspace(math.sqrt(schedule.T), math.sqrt(schedule.t_min), steps + 1, dtype=dtype)
    return _finish(s**2, schedule)


def logsnr(schedule: NoiseSchedule, steps: int, dtype=torch.float64) -> Tensor:
    """lambda uniform from lambda(T) to lambda(t_min)."""
    ends = torch.tensor([schedule.T, schedule.t_min], dtype=dtype)
    lam = schedule.lambda_(ends)
    return _finish(schedule.t_of_lambda(torch.linspace(float(lam[0]), float(lam[1]), steps + 1, dtype=dtype)),
                   schedule)


def edm(schedule: NoiseSchedule, steps: int, dtype=torch.float64, rho: float = 7.0) -> Tensor:
    """The paper's 'edm': v_i^(1/rho) uniform, rho = 7, with v = sigma for VE (EDM) schedules, as
    Karras et al., and v = t for the others (VP, latent models), as the paper's code computes it."""
    if schedule.name != "ve":
        ends = torch.tensor([schedule.T, schedule.t_min], dtype=dtype)
        v = (ends[0] ** (1 / rho) + torch.linspace(0, 1, steps + 1, dtype=dtype) * (
            ends[1] ** (1 / rho) - ends[0] ** (1 / rho))) ** rho
        return _finish(v, schedule)
    return karras(schedule, steps, dtype, rho)


def karras(schedule: NoiseSchedule, steps: int, dtype=torch.float64, rho: float = 7.0) -> Tensor:
    """Karras et al.: sigma_i^(1/rho) uniform in the EDM noise level sigma / alpha, for any schedule
    (k-diffusion's get_sigmas_karras; equal to 'edm' on VE schedules)."""
    ends = schedule.edm_sigma(torch.tensor([schedule.T, schedule.t_min], dtype=dtype))
    s_max, s_min = float(ends[0]) ** (1 / rho), float(ends[1]) ** (1 / rho)
    sig = (s_max + torch.linspace(0, 1, steps + 1, dtype=dtype) * (s_min - s_max)) ** rho
    return _finish(schedule.t_of_edm_sigma(sig), schedule)


def from_edm_sigmas(schedule: NoiseSchedule, sigmas, dtype=torch.float64) -> Tensor:
    """Times of a list of EDM noise levels (e.g. GITS tables), end points pinned to T and t_min."""
    sig = torch.as_tensor(list(sigmas), dtype=dtype)
    return _finish(schedule.t_of_edm_sigma(sig), schedule)


def flow_shift(schedule: NoiseSchedule, steps: int, dtype=torch.float64, shift: float = 3.0) -> Tensor:
    """Stable Diffusion 3's shifted grid for rectified flow: u uniform from T to t_min, then
    t = shift u / (1 + (shift - 1) u) (diffusers' FlowMatchEulerDiscreteScheduler, ``shift``; Flux's
    resolution-dependent shift is shift = e^mu). Only for the ``flow`` schedule."""
    if schedule.name != "flow":
        raise ValueError(f"the shifted flow grid is for rectified-flow models (schedule flow), not {schedule.name}")
    lo, hi = schedule.t_min, schedule.T
    # the end points stay: solve u at each end so that the shifted grid runs exactly from T to t_min
    u_hi, u_lo = hi / (shift - (shift - 1) * hi), lo / (shift - (shift - 1) * lo)
    u = torch.linspace(u_hi, u_lo, steps + 1, dtype=torch.float64)
    return _finish((shift * u / (1 + (shift - 1) * u)).to(dtype), schedule)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift exponent: mu linear in the number of image tokens, from
    ``base_shift`` at ``base_seq_len`` to ``max_shift`` at ``max_seq_len`` (diffusers' ``calculate_shift``,
    FluxPipeline's defaults); the grid is then ``sd3_shift`` with shift = e^mu."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(image_seq_len * m + base_shift - m * base_seq_len)


SKIP_TYPES = {
    "time_uniform": time_uniform,
    "time_quadratic": time_quadratic,
    "logSNR": logsnr,
    "edm": edm,
}
"""The paper's baselines, by its names (README's comparisons and plots use these)."""

MORE_SKIP_TYPES = {"time_sqrt": time_sqrt, "karras": karras, "sd3_shift": flow_shift}
"""Ours: DPM-Solver's sqrt-uniform time_quadratic, Karras spacing in sigma / alpha for any schedule, and
SD3's shifted grid (shift 3) for rectified-flow models."""


def get_discretization(skip_type: str, schedule: NoiseSchedule, steps: int, dtype=torch.float64,
                       solver_name: str | None = None, nfe: int | None = None, dataset: str = "cifar10",
                       shift: float = 3.0) -> Tensor:
    """S + 1 = ``steps + 1`` decreasing times for a baseline ``skip_type`` (or 'gits'); ``shift``: of
    ``sd3_shift``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if skip_type == "gits":
        from ld3.samplers.gits import gits_sigmas

        sig = gits_sigmas(solver_name or "ipndm", nfe if nfe is not None else steps, dataset)
        if len(sig) != steps + 1:
            raise ValueError(f"GITS table has {len(sig) - 1} steps, solver needs {steps}")
        return from_edm_sigmas(schedule, sig, dtype)
    fn = SKIP_TYPES.get(skip_type) or MORE_SKIP_TYPES.get(skip_type)
    if fn is None:
        raise ValueError(f"unknown skip_type {skip_type!r}; choose from {', '.join(ALL_SKIP_TYPES)}")
    if fn is flow_shift:
        return flow_shift(schedule, steps, dtype, shift=float(shift))
    return fn(schedule, steps, dtype)


ALL_SKIP_TYPES = (*SKIP_TYPES, *MORE_SKIP_TYPES, "gits")
