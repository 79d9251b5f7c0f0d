"""Noise schedules and the hand-made (baseline) discretizations, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from ld3.samplers.discretizations import ALL_SKIP_TYPES, get_discretization
from ld3.samplers.schedules import (
    SCHEDULES,
    FlowSchedule,
    VESchedule,
    VPCosineSchedule,
    VPDiscreteSchedule,
    VPLinearSchedule,
)

F64 = dict(dtype=torch.float64)

SCHEDULE_FACTORIES = {
    "ve": VESchedule,
    "vp_discrete": VPDiscreteSchedule.linear,
    "vp_linear": VPLinearSchedule,
    "vp_cosine": VPCosineSchedule,
    "flow": FlowSchedule,
}
VP_NAMES = ["vp_discrete", "vp_linear", "vp_cosine"]


@pytest.fixture(params=list(SCHEDULE_FACTORIES))
def schedule(request):
    return SCHEDULE_FACTORIES[request.param]()


def _whole_range(sch, n: int = 20001) -> torch.Tensor:
    """Dense times over [t_min, T]: uniform in t, and uniform in log t (dense near t_min)."""
    lin = torch.linspace(sch.t_min, sch.T, n, **F64)
    log = torch.exp(torch.linspace(math.log(sch.t_min), math.log(sch.T), n, **F64))
    return torch.cat([lin, log])


def _t(v) -> torch.Tensor:
    return torch.as_tensor(v, **F64)


# --------------------------------------------------------------------------- schedules
def test_registry_names():
    assert set(SCHEDULES) >= {"ve", "edm", "vp_discrete", "vp_linear", "vp_cosine"}


def test_t_of_lambda_inverts_lambda(schedule):
    """t(lambda(t)) == t over the whole range (required 1e-6 relative; float64 gives ~1e-12)."""
    t = _whole_range(schedule)
    back = schedule.t_of_lambda(schedule.lambda_(t))
    rel = ((back - t).abs() / t).max().item()
    assert rel < 1e-9, rel


def test_lambda_of_t_of_lambda(schedule):
    lam_ends = schedule.lambda_(_t([schedule.T, schedule.t_min]))
    lam = torch.linspace(float(lam_ends[0]), float(lam_ends[1]), 5001, **F64)
    assert torch.allclose(schedule.lambda_(schedule.t_of_lambda(lam)), lam, rtol=0, atol=1e-9)


def test_lambda_strictly_decreasing(schedule):
    t = torch.linspace(schedule.t_min, schedule.T, 20001, **F64)
    assert (torch.diff(schedule.lambda_(t)) < 0).all()


def test_lambda_is_log_alpha_over_sigma(schedule):
    t = _whole_range(schedule, 2001)
    lam = torch.log(schedule.alpha(t)) - torch.log(schedule.sigma(t))
    assert torch.allclose(schedule.lambda_(t), lam, rtol=1e-12, atol=1e-12)
    assert torch.allclose(schedule.edm_sigma(t), schedule.sigma(t) / schedule.alpha(t), rtol=1e-12)
    assert torch.allclose(schedule.t_of_edm_sigma(schedule.edm_sigma(t)), t, rtol=1e-9)


def test_endpoints_round_trip(schedule):
    ends = _t([schedule.T, schedule.t_min])
    back = schedule.t_of_lambda(schedule.lambda_(ends))
    assert torch.allclose(back, ends, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", VP_NAMES)
def test_vp_alpha_sigma_unit_norm(name):
    sch = SCHEDULE_FACTORIES[name]()
    t = _whole_range(sch, 5001)
    a, s = sch.alpha(t), sch.sigma(t)
    assert torch.allclose(a**2 + s**2, torch.ones_like(t), rtol=0, atol=1e-14)
    assert ((a > 0) & (a < 1) & (s > 0) & (s < 1)).all()
    assert float(sch.prior(torch.ones(()))) == 1.0


def test_ve_values():
    sch = VESchedule()
    assert (sch.t_min, sch.T) == (0.002, 80.0)
    t = _whole_range(sch, 1001)
    assert torch.equal(sch.alpha(t), torch.ones_like(t))
    assert torch.equal(sch.sigma(t), t)
    assert torch.allclose(sch.lambda_(t), -torch.log(t), rtol=0, atol=1e-15)
    assert float(sch.sigma(_t(sch.T))) == 80.0 and float(sch.sigma(_t(sch.t_min))) == 0.002
    z = torch.randn(3, **F64)
    assert torch.equal(sch.prior(z), 80.0 * z)
    assert float(sch.lambda_(_t(80.0))) == -math.log(80.0)


def test_vp_discrete_matches_alphas_cumprod_at_knots():
    """alpha(t_n)^2 == alphas_cumprod[n-1] at t_n = n / N, n = 1..N; endpoints t = 1/N and 1."""
    sch = VPDiscreteSchedule.linear(1000)
    n = torch.arange(1, sch.N + 1, **F64)
    a2 = sch.alpha(n / sch.N) ** 2
    assert torch.allclose(a2, sch.alphas_cumprod, rtol=1e-13, atol=0)
    assert sch.t_min == 1 / 1000 and sch.T == 1.0
    assert abs(float(sch.alpha(_t(sch.T))) ** 2 - float(sch.alphas_cumprod[-1])) < 1e-16
    assert abs(float(sch.alpha(_t(sch.t_min))) ** 2 - float(sch.alphas_cumprod[0])) < 1e-16
    # the 'scaled linear' betas of latent diffusion
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, **F64) ** 2
    assert torch.allclose(sch.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-14)
    # network time input: N (t - 1/N), i.e. 0 .. N-1 at the knots
    assert torch.allclose(sch.model_time(n / sch.N), n - 1, rtol=0, atol=1e-9)


def test_vp_discrete_is_linear_between_knots():
    sch = VPDiscreteSchedule.linear(1000)
    n = torch.arange(1, sch.N, **F64)
    mid = (n + 0.5) / sch.N
    la = sch.log_alpha
    expected = 0.5 * (la(n / sch.N) + la((n + 1) / sch.N))
    assert torch.allclose(la(mid), expected, rtol=0, atol=1e-14)


def test_vp_discrete_from_alphas_cumprod_equals_from_betas():
    betas = torch.linspace(1e-4, 0.02, 1000, **F64)
    a = VPDiscreteSchedule(betas=betas)
    b = VPDiscreteSchedule(alphas_cumprod=torch.cumprod(1 - betas, 0))
    t = torch.rand(100, **F64) * (1 - 1e-3) + 1e-3
    assert torch.allclose(a.lambda_(t), b.lambda_(t), rtol=0, atol=1e-13)
    with pytest.raises(ValueError):
        VPDiscreteSchedule()


def test_vp_linear_closed_form():
    """log alpha = -int_0^t beta / 2 with beta(s) = beta_0 + s (beta_1 - beta_0)."""
    sch = VPLinearSchedule()
    t = _whole_range(sch, 1001)
    expected = -0.5 * (0.1 * t + 0.5 * (20.0 - 0.1) * t**2)
    assert torch.allclose(sch.log_alpha(t), expected, rtol=1e-14, atol=0)


def test_vp_cosine_closed_form():
    sch = VPCosineSchedule()
    t = _whole_range(sch, 1001)
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2)  # noqa: E731
    assert torch.allclose(sch.alpha(t) ** 2, (f(t) / f(torch.zeros((), **F64))) ** 2, rtol=1e-12)


def _fd_points(sch) -> torch.Tensor:
    """Points for finite differences; for vp_discrete the middles of the linear pieces."""
    if isinstance(sch, VPDiscreteSchedule):
        n = torch.arange(1, sch.N, 7, **F64)
        return (n + 0.5) / sch.N
    return torch.exp(torch.linspace(math.log(sch.t_min * 1.01), math.log(sch.T * 0.99), 200, **F64))


def test_ode_coefficients_against_finite_differences(schedule):
    """f = d log(alpha)/dt and g = d sigma/dt - sigma f, against central differences."""
    t = _fd_points(schedule)
    d = 1e-7 if isinstance(schedule, VPDiscreteSchedule) else 1e-5 * t
    f, g = schedule.ode_coefficients(t)
    f_fd = (schedule.log_alpha(t + d) - schedule.log_alpha(t - d)) / (2 * d)
    ds_fd = (schedule.sigma(t + d) - schedule.sigma(t - d)) / (2 * d)
    assert torch.allclose(f, f_fd, rtol=1e-5, atol=1e-9)
    assert torch.allclose(g, ds_fd - schedule.sigma(t) * f_fd, rtol=1e-5, atol=1e-9)


def test_ode_coefficients_closed_forms():
    """VP linear: f = -beta(t) / 2; VP cosine: f = -pi / (2 (1 + s)) tan(...); VE: f = 0, g = 1."""
    lin, cos = VPLinearSchedule(), VPCosineSchedule()
    t = torch.linspace(0.01, 0.98, 50, **F64)
    assert torch.allclose(lin.ode_coefficients(t)[0], -0.5 * (0.1 + t * (20.0 - 0.1)), rtol=1e-13)
    f_cos = -math.pi / (2 * 1.008) * torch.tan((t + 0.008) / 1.008 * math.pi / 2)
    assert torch.allclose(cos.ode_coefficients(t)[0], f_cos, rtol=1e-13)
    f, g = VESchedule().ode_coefficients(t)
    assert torch.equal(f, torch.zeros_like(t)) and torch.equal(g, torch.ones_like(t))


def test_ode_coefficients_without_grad_hand_out_no_graph(schedule):
    f, g = schedule.ode_coefficients(torch.tensor([0.3, 0.5], **F64) * schedule.T)
    assert not f.requires_grad and not g.requires_grad


def test_ode_coefficients_keep_the_graph():
    """With t requiring grad, the coefficients are differentiable in t (the solvers need it)."""
    sch = VPLinearSchedule()
    t = torch.tensor([0.3, 0.7], **F64, requires_grad=True)
    f, g = sch.ode_coefficients(t)
    (df,) = torch.autograd.grad(f.sum(), t, retain_graph=True)
    # f = -(beta_0 + t (beta_1 - beta_0)) / 2, so df/dt = -(beta_1 - beta_0) / 2
    assert torch.allclose(df, torch.full_like(t, -(20.0 - 0.1) / 2), rtol=1e-12)
    (dg,) = torch.autograd.grad(g.sum(), t)
    d = 1e-6
    g_p = sch.ode_coefficients(t.detach() + d)[1]
    g_m = sch.ode_coefficients(t.detach() - d)[1]
    assert torch.allclose(dg, (g_p - g_m) / (2 * d), rtol=1e-6)


# --------------------------------------------------------------------------- discretizations
STEP_COUNTS = [1, 2, 3, 5, 10, 50]


@pytest.mark.parametrize("skip_type", sorted(set(ALL_SKIP_TYPES) - {"gits"}))
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_discretization_shape_endpoints_monotone(schedule, skip_type, steps):
    if skip_type == "sd3_shift" and schedule.name != "flow":
        with pytest.raises(ValueError, match="rectified-flow"):
            get_discretization(skip_type, schedule, steps)
        return
    t = get_discretization(skip_type, schedule, steps)
    assert t.dtype == torch.float64 and t.shape == (steps + 1,)
    assert float(t[0]) == schedule.T and float(t[-1]) == schedule.t_min  # exactly
    assert (torch.diff(t) < 0).all()


def _assert_uniform(v: torch.Tensor, rtol: float = 1e-9):
    d = torch.diff(v)
    assert torch.allclose(d, d.mean().expand_as(d), rtol=rtol, atol=0), d


@pytest.mark.parametrize("steps", [2, 5, 17])
def test_time_uniform_is_uniform(schedule, steps):
    _assert_uniform(get_discretization("time_uniform", schedule, steps))


@pytest.mark.parametrize("steps", [2, 5, 17])
def test_time_quadratic_is_quadratic_in_the_step_index(schedule, steps):
    """The paper's time_quadratic: (t_i - t_min) / (T - t_min) = ((S - i) / S)^2, so its square root
    is uniform in i."""
    t = get_discretization("time_quadratic", schedule, steps)
    _assert_uniform(torch.sqrt((t - schedule.t_min) / (schedule.T - schedule.t_min)))


def test_time_quadratic_nfe4_is_the_papers():
    """The paper's grid for NFE 4 on EDM's [0.002, 80] (LD3_SPEC section 4)."""
    t = get_discretization("time_quadratic", VESchedule(), 4)
    assert torch.allclose(t, torch.tensor([80, 45.000875, 20.0015, 5.001875, 0.002], **F64), rtol=1e-12)


@pytest.mark.parametrize("steps", [2, 5, 17])
def test_time_sqrt_is_uniform_in_sqrt_t(schedule, steps):
    t = get_discretization("time_sqrt", schedule, steps)
    _assert_uniform(torch.sqrt(t))


@pytest.mark.parametrize("steps", [2, 5, 17])
def test_logsnr_is_uniform_in_lambda(schedule, steps):
    t = get_discretization("logSNR", schedule, steps)
    _assert_uniform(schedule.lambda_(t))


@pytest.mark.parametrize("steps", [2, 5, 17])
def test_karras_is_uniform_in_sigma_to_the_one_seventh(schedule, steps):
    t = get_discretization("karras", schedule, steps)
    _assert_uniform(schedule.edm_sigma(t) ** (1 / 7))


@pytest.mark.parametrize("steps", [2, 5, 17])
def test_edm_is_the_papers(schedule, steps):
    """The paper's edm: uniform in sigma^(1/7) on VE schedules (= karras), in t^(1/7) on the others."""
    t = get_discretization("edm", schedule, steps)
    _assert_uniform((schedule.edm_sigma(t) if schedule.name == "ve" else t) ** (1 / 7))
    if schedule.name == "ve":
        assert torch.equal(t, get_discretization("karras", schedule, steps))


def test_edm_on_ve_matches_karras_formula():
    """Karras et al. eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    t = get_discretization("edm", VESchedule(), 18)
    i = torch.arange(19, **F64)
    r = 1 / 7
    expected = (80.0**r + i / 18 * (0.002**r - 80.0**r)) ** 7
    assert torch.allclose(t, expected, rtol=1e-13, atol=0)


def test_get_discretization_rejects_bad_input():
    sch = VESchedule()
    with pytest.raises(ValueError):
        get_discretization("time_uniform", sch, 0)
    with pytest.raises(ValueError, match="skip_type"):
        get_discretization("no_such_spacing", sch, 5)
