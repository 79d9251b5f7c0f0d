"""Rectified-flow schedule (SD3 / Flux): identities, solver orders on a Gaussian's closed-form flow,
velocity -> noise conversion, SD3's shifted grid."""

from __future__ import annotations

import pytest
import torch

from ld3.models.analytic import GaussianNoise
from ld3.models.base import velocity_noise_fn
from ld3.samplers.discretizations import get_discretization
from ld3.samplers.schedules import FlowSchedule, NoiseSchedule
from ld3.samplers.solvers import solve
from tests.test_solvers import GLOBAL_CASES, gaussian_start, slope, whitened_error, wide_gaussian

F64 = dict(dtype=torch.float64)


def test_flow_schedule_identities():
    s = FlowSchedule()
    t = torch.linspace(s.t_min, s.T, 50, **F64)
    assert torch.allclose(s.alpha(t) + s.sigma(t), torch.ones_like(t))
    assert torch.allclose(s.t_of_lambda(s.lambda_(t)), t, rtol=1e-12)
    assert torch.allclose(s.lambda_(t), torch.log(s.alpha(t) / s.sigma(t)))
    f, g = s.ode_coefficients(t)
    f_ad, g_ad = NoiseSchedule.ode_coefficients(s, t)  # the generic derivative of alpha and sigma
    assert torch.allclose(f, f_ad) and torch.allclose(g, g_ad)
    assert torch.allclose(s.model_time(t), 1000 * t)
    with pytest.raises(ValueError):
        FlowSchedule(t_min=0.0)


WANTED = {("euler", 1), ("heun", 2), ("dpm_solver++", 2), ("dpm_solver++", 3), ("ipndm", 2), ("dpm_solver", 2)}
CASES = [c for c in GLOBAL_CASES if not c[2] and (c[0], c[1]) in WANTED]
CASES += [c for c in GLOBAL_CASES if c[0] == "uni_pc" and c[1] == 3 and set(c[2]) == {"variant"}]


@pytest.mark.parametrize("name,order,opts,predicted,steps", [c[:5] for c in CASES],
                         ids=[f"{c[0]}-{c[1]}" + (f"-{c[2]['variant']}" if c[2] else "") for c in CASES])
def test_global_order_on_the_flow(name, order, opts, predicted, steps):
    """The same orders as on VE and VP (see tests/test_solvers.py::test_global_order), against the Gaussian's
    closed-form flow."""
    net = wide_gaussian("flow")
    sch = net.schedule
    x_t = gaussian_start(net)
    exact = net.exact_solution(x_t, sch.T, sch.t_min)
    errors = []
    for s in steps:
        out = solve(name, net, sch, x_t, get_discretization("logSNR", sch, s), order=order, **opts)
        errors.append(whitened_error(net, out, exact, torch.tensor(sch.t_min, **F64)))
    assert abs(-slope(steps, errors) - predicted) <= 0.3, errors


def test_velocity_model_gives_the_exact_noise_prediction():
    """v = dx/dt = eps - x_0 for rectified flow; velocity_noise_fn turns it back into eps exactly."""
    sch = FlowSchedule()
    net = GaussianNoise(sch, torch.randn(12, **F64), 0.1 + torch.rand(12, **F64))
    x = torch.randn(5, 12, **F64)
    t = torch.tensor([0.9, 0.5, 0.2, 0.05, 0.01], **F64)

    def velocity(x, t, c=None, uc=None):
        eps = net(x, t.reshape(-1, 1))
        x0 = (x - t.reshape(-1, 1) * eps) / (1 - t.reshape(-1, 1))
        return eps - x0

    eps = velocity_noise_fn(velocity, sch)(x, t)
    assert torch.allclose(eps, net(x, t.reshape(-1, 1)), rtol=1e-10, atol=1e-12)


def test_sd3_shift_grid():
    sch = FlowSchedule()
    t = get_discretization("sd3_shift", sch, 8)
    assert t[0] == sch.T and t[-1] == sch.t_min and bool((t[1:] < t[:-1]).all())
    u = t / (3 - 2 * t)  # the inverse of the shift: uniform
    assert torch.allclose(u[1:] - u[:-1], (u[1] - u[0]).expand(8), rtol=1e-10)
    with pytest.raises(ValueError, match="rectified-flow"):
        get_discretization("sd3_shift", wide_gaussian("ve").schedule, 4)


@pytest.mark.parametrize("kind", ["vp_discrete", "flow", "ve"])
def test_eps_from_v_inverts_the_v_parameterization(kind):
    """x = alpha x0 + sigma eps, v = alpha eps - sigma x0 (Salimans & Ho) -> eps exactly, any schedule."""
    from ld3.models.analytic import make_schedule
    from ld3.models.base import eps_from_v, vprediction_noise_fn

    sch = make_schedule(kind)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 1, 4, 4, generator=g,
                                                                                    dtype=torch.float64)
    t = torch.linspace(sch.t_min * 2, sch.T * 0.9, 5, dtype=torch.float64)
    a, s = sch.alpha(t).reshape(-1, 1, 1, 1), sch.sigma(t).reshape(-1, 1, 1, 1)
    x, v = a * x0 + s * eps, a * eps - s * x0
    assert torch.allclose(eps_from_v(v, x, sch.alpha(t), sch.sigma(t)), eps, atol=1e-12)
    fn = vprediction_noise_fn(lambda x_, t_, c=None, u=None: v, sch)
    assert torch.allclose(fn(x, t), eps, atol=1e-12)


def test_flux_resolution_shift_matches_diffusers():
    """Flux's mu (diffusers' calculate_shift) and its time shift = SD3's shift formula with shift = e^mu;
    --flow_shift auto takes mu from the model's image tokens."""
    import math
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from ld3.runtime import flow_shift_of
    from ld3.samplers.discretizations import flow_shift, flux_mu
    from ld3.samplers.schedules import FlowSchedule

    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    for seq in (16, 1024, 4096, 9000):
        assert flux_mu(seq) == pytest.approx(calculate_shift(seq), abs=1e-12)
    mu = flux_mu(4096)
    sch = FlowSchedule()
    t = flow_shift(sch, 8, shift=math.exp(mu))
    sc = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    u = t / (math.exp(mu) - (math.exp(mu) - 1) * t)  # the unshifted positions: uniform
    assert torch.allclose(u[1:] - u[:-1], (u[1:] - u[:-1]).mean().expand(8), atol=1e-12)
    assert torch.allclose(torch.as_tensor(sc.time_shift(mu, 1.0, u), dtype=torch.float64), t, atol=1e-12)
    model = SimpleNamespace(info={}, latent_shape=(16, 128, 128))  # Flux 1024 px: 64 x 64 = 4096 tokens
    assert flow_shift_of({"flow_shift": "auto"}, model) == pytest.approx(math.exp(1.15))
    assert flow_shift_of({"flow_shift": "3.0"}, model) == 3.0
