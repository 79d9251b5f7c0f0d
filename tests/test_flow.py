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
