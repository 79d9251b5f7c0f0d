"""The solvers, against closed forms, an independent ODE integration, finite differences and a
plain reference implementation. Everything in float64.

Orders are measured on a Gaussian data distribution, whose probability-flow ODE has a closed-form
solution (models/analytic.py). Its design, and the error metric, are chosen so that the rate the
analysis predicts is the one that dominates the measured error (see ``wide_gaussian`` and
``whitened_error``); slopes must be within 0.3 of the prediction.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.special import logsumexp

from ld3.models.analytic import GaussianNoise, digits_gmm_model, make_schedule
from ld3.samplers.discretizations import get_discretization
from ld3.samplers.reference import dpm_solver_pp_2m, exponential_integrator_step
from ld3.samplers.solvers import (
    SOLVERS,
    Solve,
    dpm_solver_pp_step,
    dpm_solver_step,
    heun_step,
    ipndm_step,
    nfe_of,
    singlestep_orders,
    solve,
    step_orders,
    steps_for_nfe,
    uni_pc_step,
)

F64 = dict(dtype=torch.float64)
SCHEDULE_NAMES = ["ve", "vp_discrete"]

# every solver at every order it supports (uni_pc in both variants)
ALL_CONFIGS = (
    [("euler", 1, {}), ("heun", 2, {})]
    + [("dpm_solver++", k, {}) for k in (1, 2, 3)]
    + [("uni_pc", k, {"variant": v}) for v in ("bh1", "bh2") for k in (1, 2, 3)]
    + [("ipndm", k, {}) for k in (1, 2, 3, 4)]
    + [("dpm_solver", k, {}) for k in (1, 2, 3)]
)


def _cfg_id(cfg) -> str:
    name, order, opts = cfg[:3]
    extra = "-".join(f"{v}" if k == "variant" else f"{k}={v}" for k, v in opts.items())
    return f"{name}-{order}" + (f"-{extra}" if extra else "")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def slope(xs, errors) -> float:
    """Least-squares slope of log(error) against log(x)."""
    return float(np.polyfit(np.log(xs), np.log(errors), 1)[0])


# --------------------------------------------------------------------------- Gaussian test problem
@functools.lru_cache(maxsize=None)
def wide_gaussian(schedule_name: str, n: int = 12) -> GaussianNoise:
    """x_0 ~ N(mu, diag(std^2)) with std log-spaced over [e^{-lambda_max} / 2, 2 e^{-lambda_min}].

    Along the ODE the data prediction of dimension d is
    mu_d + std_d z_d std_d / sqrt(std_d^2 + e^{-2 lambda}):
    it changes only within O(1) of lambda = -log std_d and is constant elsewhere. With a single
    std, or stds only in the middle, the first (warm-up) and last (lower_order_final) steps would
    see an almost constant data prediction, their error constants would be tiny, and the measured
    slopes would show the steady-state order where the analysis predicts a lower one. Spreading
    the stds over (slightly beyond) the whole lambda range of the schedule gives every step,
    including the first and the last, a dimension in transition.
    """
    sch = make_schedule(schedule_name)
    lam = sch.lambda_(torch.tensor([sch.T, sch.t_min], **F64))
    lo, hi = math.exp(-float(lam[1])) / 2, 2 * math.exp(-float(lam[0]))
    std = torch.tensor([lo * (hi / lo) ** (i / (n - 1)) for i in range(n)], **F64)
    mu = 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(0), **F64)
    return GaussianNoise(sch, mu, std)


def whitened_error(net: GaussianNoise, out: torch.Tensor, exact: torch.Tensor, t: torch.Tensor) -> float:
    """Relative L2 error with each dimension divided by its exact marginal std at t.

    The exact x_t of dimension d has std sqrt(alpha^2 std_d^2 + sigma^2). In plain L2 the
    dimensions with a small std (those in transition near t_min, where the last step acts) would
    not count; whitening makes every dimension count alike.
    """
    sch = net.schedule
    a, s = sch.alpha(t), sch.sigma(t)
    scale = torch.sqrt(a**2 * net.std**2 + s**2)
    return float(((out - exact) / scale).norm() / ((exact - a * net.mu) / scale).norm())


def gaussian_start(net: GaussianNoise, batch: int = 4) -> torch.Tensor:
    z = torch.randn(batch, *net.std.shape, generator=torch.Generator().manual_seed(1), **F64)
    return net.schedule.prior(z)


# --------------------------------------------------------------------------- local order
LAMBDA_START = {"ve": 1.0, "vp_discrete": 0.5}
STEP_SIZES = [0.1, 0.05, 0.025, 0.0125]  # h in lambda

# (kind, order, variant, expected slope of the one-step error against h)
LOCAL_CASES = (
    [("euler", 1, None, 2), ("heun", 2, None, 3)]
    + [("dpm_solver++", k, None, k + 1) for k in (1, 2, 3)]
    + [("uni_pc_predictor", k, v, k + 1) for v in ("bh1", "bh2") for k in (1, 2, 3)]
    + [("uni_pc_corrector", k, v, k + 2) for v in ("bh1", "bh2") for k in (1, 2, 3)]
    + [("ipndm_uniform_s", k, None, k + 1) for k in (1, 2, 3, 4)]
    + [("ipndm_uniform_lambda", k, None, min(k + 1, 3)) for k in (1, 2, 3, 4)]
    + [("dpm_solver", k, None, k + 1) for k in (1, 2, 3)]
)
# the same on non-uniform histories / intermediate points (ratios below)
LOCAL_CASES += [(kind + "@nonuniform", k, v, e) for kind, k, v, e in LOCAL_CASES
                if kind in ("dpm_solver++", "uni_pc_predictor", "uni_pc_corrector", "dpm_solver") and k > 1]
# DPM-Solver-3's last intermediate point must sit at r2 = 2/3 of the step (see test_local_order)
LOCAL_CASES += [("dpm_solver@r2=0.75", 3, None, 3)]
HISTORY_GAPS = [0.6, 1.5]  # lambda_i - lambda_{i-1} = 0.6 h, lambda_{i-1} - lambda_{i-2} = 1.5 h
SINGLESTEP_POINTS = {  # intermediate points of one singlestep update, as fractions of its lambda step
    "nonuniform": {2: [0.0, 0.4, 1.0], 3: [0.0, 0.3, 2 / 3, 1.0]},
    "r2=0.75": {3: [0.0, 0.3, 0.75, 1.0]},
}


def local_error(schedule_name: str, kind: str, k: int, h: float, variant: str | None) -> float:
    """Error of ONE update of order k from the exact state, with exact past model outputs.

    The grid is t_0 > ... > t_k with the update from t_{k-1} to t_k of size h in lambda; for
    multistep methods the k - 1 earlier points carry the exact history (data predictions m_j, or
    noise predictions for iPNDM, all evaluated on the exact trajectory). The solvers' own update
    functions (``*_step`` in samplers/solvers.py, which the solvers loop over) do the update.
    """
    net = wide_gaussian(schedule_name)
    sch = net.schedule
    lam_a = LAMBDA_START[schedule_name]
    kind, _, spacing = kind.partition("@")
    if kind == "dpm_solver" and spacing:
        lams = [lam_a + f * h for f in SINGLESTEP_POINTS[spacing][k]]
    elif spacing:
        offsets = [0.0]
        for gap in HISTORY_GAPS[: k - 1]:
            offsets.insert(0, offsets[0] - gap)
        lams = [lam_a + o * h for o in offsets] + [lam_a + h]
    elif kind == "dpm_solver":  # one singlestep update over k intervals, intermediate points at j/k
        lams = [lam_a + j * h / k for j in range(k + 1)]
    elif kind == "ipndm_uniform_s":  # history equally spaced in s = sigma / alpha = e^{-lambda}
        s_a = math.exp(-lam_a)
        ds = s_a * math.expm1(-h)
        lams = [-math.log(s_a + (j - (k - 1)) * ds) for j in range(k + 1)]
    elif kind in ("euler", "heun"):
        lams = [lam_a, lam_a + h]
    else:  # history equally spaced in lambda
        lams = [lam_a + (j - (k - 1)) * h for j in range(k + 1)]
    t = sch.t_of_lambda(torch.tensor(lams, **F64))
    x_start = gaussian_start(net)
    xs = [net.exact_solution(x_start, sch.T, ti) for ti in t]
    g = Solve.start(net, sch, x_start, t)
    i = len(lams) - 2  # the update goes from t_i to t_{i+1}
    ms = [g.x0(xs[j], g.eps(xs[j], j), j) for j in range(i + 1)]
    if kind == "euler":
        out = solve("euler", net, sch, xs[0], t)
    elif kind == "heun":
        out = heun_step(g, xs[0], 0)
    elif kind == "dpm_solver++":
        out = dpm_solver_pp_step(g, xs[i], ms, i, k)
    elif kind.startswith("uni_pc"):
        out, _ = uni_pc_step(g, xs[i], ms, i, k, variant, corrector=kind == "uni_pc_corrector")
    elif kind.startswith("ipndm"):
        eps_hist = [g.eps(xs[j], j) for j in range(i, -1, -1)]  # newest first
        out = g.alpha[i + 1] * ipndm_step(g, xs[i] / g.alpha[i], eps_hist, i, k)
    elif kind == "dpm_solver":
        out = dpm_solver_step(g, xs[0], 0, k)
    else:
        raise AssertionError(kind)
    return whitened_error(net, out, xs[-1], t[-1])


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("kind,k,variant,expected", LOCAL_CASES,
                         ids=[f"{c[0]}-{c[1]}" + (f"-{c[2]}" if c[2] else "") for c in LOCAL_CASES])
def test_local_order(schedule_name, kind, k, variant, expected):
    """One update of order k from the exact trajectory has error O(h^(k+1)), on uniform and
    (@nonuniform) non-uniform histories / singlestep intermediate points.

    UniPC with its corrector (which uses the model at the predicted point): O(h^(k+2)).
    iPNDM's fixed Adams-Bashforth weights are exact for a history equally spaced in
    s = sigma / alpha: O(h^(k+1)). On a history equally spaced in lambda (geometric in s, as
    the logSNR and edm grids give) the weights are off by O(h) from the variable-step ones; as
    they still sum to 1 this costs O(h) * O(h) * h: O(h^3) for every k >= 2.
    Singlestep DPM-Solver-3 is O(h^4) for any r1 but only when r2 = 2/3: its first intermediate
    state u1 is a first-order step (error O(h^2)), and the final formula weights eps(u1) by
    sigma_t (r2 phi_2 - 2 phi_3) / (r2 - r1), which is O(h^2) only for r2 = 2/3; else O(h^3).
    """
    errors = [local_error(schedule_name, kind, k, h, variant) for h in STEP_SIZES]
    observed = slope(STEP_SIZES, errors)
    assert abs(observed - expected) <= 0.3, (observed, errors)


def test_unipc_bh2_predictor_is_dpm_solver_pp():
    """UniP-k with B(h) = e^h - 1 is the multistep DPM-Solver++ k (Zhao et al. 2023, sec. 3.3), also for
    k = 3 on a non-uniform history: an independent check of the 3M coefficients."""
    for schedule_name in SCHEDULE_NAMES:
        net = wide_gaussian(schedule_name)
        sch = net.schedule
        t = sch.t_of_lambda(torch.tensor([-0.4, 0.35, 0.6, 1.3], **F64))
        x_start = gaussian_start(net)
        xs = [net.exact_solution(x_start, sch.T, ti) for ti in t]
        g = Solve.start(net, sch, x_start, t)
        ms = [g.x0(xs[j], g.eps(xs[j], j), j) for j in range(3)]
        for k in (1, 2, 3):
            a = dpm_solver_pp_step(g, xs[2], ms, 2, k)
            b, m_next = uni_pc_step(g, xs[2], ms, 2, k, "bh2", corrector=False)
            assert m_next is None
            assert rel_err(b, a) < 1e-13, (schedule_name, k)


# --------------------------------------------------------------------------- global order
S_VALUES = [80, 160, 320, 640]

# (solver, order, options, predicted global order, step counts)
GLOBAL_CASES = (
    [("euler", 1, {}, 1), ("heun", 2, {}, 2)]
    + [("dpm_solver++", 1, {}, 1), ("dpm_solver++", 2, {}, 2), ("dpm_solver++", 3, {}, 2),
       ("dpm_solver++", 3, {"lower_order_final": False}, 2)]
    + [("uni_pc", k, {"variant": v}, 2) for v in ("bh1", "bh2") for k in (1, 2, 3)]
    + [("uni_pc", k, {"variant": v, "lower_order_final": False}, p)
       for v in ("bh1", "bh2") for k, p in ((1, 2), (2, 3), (3, 3))]
    + [("ipndm", 1, {}, 1), ("ipndm", 2, {}, 2), ("ipndm", 3, {}, 2), ("ipndm", 4, {}, 2)]
    + [("dpm_solver", 1, {}, 1), ("dpm_solver", 2, {}, 2)]
)
GLOBAL_CASES = [c + (S_VALUES,) for c in GLOBAL_CASES] + [
    # singlestep order 3: S = 2 (mod 3) splits into [3, ..., 3, 2]; S = 0 (mod 3) into [3, ..., 3, 2, 1]
    ("dpm_solver", 3, {}, 3, [3 * (s // 3) + 2 for s in S_VALUES]),
    ("dpm_solver", 3, {}, 2, [3 * (s // 3) for s in S_VALUES]),
]


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("name,order,opts,predicted,steps", GLOBAL_CASES,
                         ids=[_cfg_id(c) + f"-S{c[4][0] % 3}" * (c[0] == "dpm_solver" and c[1] == 3)
                              for c in GLOBAL_CASES])
def test_global_order(schedule_name, name, order, opts, predicted, steps):
    """Final error against the closed form falls as S^-p, S = 80 ... 640 on the logSNR grid (h = L / S).

    Analysis. Steady steps with local error O(h^(q+1)) accumulate O(h^q) over S = O(1/h) steps;
    each of a fixed number of special steps (warm-up, lower_order_final, heun's final Euler step)
    with local error O(h^(p+1)) adds O(h^(p+1)). The global order is the smallest of these:
    - euler: local h^2 -> 1.
    - heun: steady local h^3 -> 2; final Euler step h^2 -> 2.
    - dpm_solver++ k: steady h^(k+1) -> k; warm-up first step (order 1) h^2, and with
      lower_order_final also the last step -> min(k, 2): 1, 2, 2 (with or without lower_order_final).
    - uni_pc k: the corrector makes each corrected step local h^(k+2) -> k + 1; the first step
      (order 1 + corrector) h^3; the last step has no corrector: order k, h^(k+1), or with
      lower_order_final order 1, h^2. So 2 for every k with lower_order_final; without it
      min(k + 1, 3): 2, 3, 3.
    - ipndm k: order-1 warm-up h^2, and AB weights fixed for equal steps in s = sigma / alpha
      but used on a grid geometric in s: h^3 for k >= 2 (test_local_order) -> 1, 2, 2, 2.
    - dpm_solver k (singlestep): each order-k step h^(k+1) -> k, but the NFE split can end with
      lower-order steps: order 3 with S = 2 (mod 3) ends [.., 3, 2] -> 3; S = 0 (mod 3) ends
      [.., 2, 1] -> 2; order 2 with even S -> 2.
    """
    net = wide_gaussian(schedule_name)
    sch = net.schedule
    x_t = gaussian_start(net)
    exact = net.exact_solution(x_t, sch.T, sch.t_min)
    t_end = torch.tensor(sch.t_min, **F64)
    errors = []
    for s in steps:
        out = solve(name, net, sch, x_t, get_discretization("logSNR", sch, s), order=order, **opts)
        errors.append(whitened_error(net, out, exact, t_end))
    observed = -slope(steps, errors)
    assert abs(observed - predicted) <= 0.3, (observed, errors)


# --------------------------------------------------------------------------- consistency (digits GMM)
@functools.lru_cache(maxsize=None)
def gmm_problem(schedule_name: str):
    model = digits_gmm_model(schedule_name)
    x_t = model.schedule.prior(torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), **F64))
    return model, x_t


@functools.lru_cache(maxsize=None)
def gmm_reference_solution(schedule_name: str) -> torch.Tensor:
    """The digits GMM's ODE solved by scipy (DOP853, rtol 1e-10), written out independently here.

    In y = x / alpha and lambda the ODE is dy/dlambda = D(y; s) - y, s = e^{-lambda} (EDM noise
    level), and for a mixture sum_k w_k N(mu_k, diag(v_k)) the denoiser is
    D = sum_k p_k (mu_k + v_k (y - mu_k) / (v_k + s^2)), p_k proportional to w_k N(y; mu_k, v_k + s^2).
    Smooth in lambda, and independent of the schedule except for the end points.
    """
    model, x_t = gmm_problem(schedule_name)
    net, sch = model.net, model.schedule
    log_w, mu, v = net.log_w.numpy(), net.means.numpy(), net.variances.numpy()
    ends = torch.tensor([sch.T, sch.t_min], **F64)
    lam_start, lam_end = (float(u) for u in sch.lambda_(ends))
    a_start, a_end = (float(u) for u in sch.alpha(ends))
    batch = x_t.shape[0]

    def rhs(lam, y):
        y = y.reshape(batch, 1, -1)
        var = v[None] + math.exp(-2.0 * lam)
        logp = -0.5 * ((y - mu[None]) ** 2 / var + np.log(2 * math.pi * var)).sum(-1) + log_w[None]
        p = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        denoised = (p[:, :, None] * (mu[None] + v[None] * (y - mu[None]) / var)).sum(1)
        return (denoised - y[:, 0]).ravel()

    y0 = (x_t.reshape(batch, -1).numpy() / a_start).ravel()
    sol = solve_ivp(rhs, (lam_start, lam_end), y0, method="DOP853", rtol=1e-10, atol=1e-12)
    assert sol.success
    return torch.from_numpy(a_end * sol.y[:, -1]).reshape(x_t.shape)


# steps per solver to reach 1e-4: 200 for the third-order ones; second order: 800 (at 200 some are
# at 1e-4 to 3e-4, at 400 within a factor 1.5 of it); first order (global error ~1.3 / S on ve,
# ~0.7 / S on vp_discrete): thousands.
CONSISTENCY_STEPS = {
    ("euler", 1): {"ve": 20000, "vp_discrete": 12000},
    ("dpm_solver++", 1): {"ve": 20000, "vp_discrete": 12000},
    ("heun", 2): 800, ("dpm_solver++", 2): 800, ("uni_pc", 1): 800,
    ("ipndm", 2): 800, ("ipndm", 3): 800, ("ipndm", 4): 800, ("dpm_solver", 2): 800,
    ("dpm_solver++", 3): 200, ("uni_pc", 2): 200, ("uni_pc", 3): 200, ("dpm_solver", 3): 200,
}
FIRST_ORDER_SAME_AS_DDIM = [("ipndm", 1), ("dpm_solver", 1)]
CONSISTENCY_CONFIGS = [c for c in ALL_CONFIGS if (c[0], c[1]) not in FIRST_ORDER_SAME_AS_DDIM]


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("name,order,opts", CONSISTENCY_CONFIGS,
                         ids=[_cfg_id(c) for c in CONSISTENCY_CONFIGS])
def test_consistency_with_reference_ode(schedule_name, name, order, opts):
    """Every solver lands within 1e-4 (relative L2) of an independent DOP853 solution of the digits
    GMM's ODE: at 200 steps (third order), 800 (second order) or 12000-20000 (first order)."""
    model, x_t = gmm_problem(schedule_name)
    reference = gmm_reference_solution(schedule_name)
    steps = CONSISTENCY_STEPS[(name, order)]
    steps = steps[schedule_name] if isinstance(steps, dict) else steps
    # logSNR for all; the non-uniform edm grid too where it is cheap
    for skip_type in ("logSNR", "edm") if steps <= 800 else ("logSNR",):
        t = get_discretization(skip_type, model.schedule, steps)
        with torch.no_grad():
            out = solve(name, model.noise_fn, model.schedule, x_t, t, order=order, **opts)
        assert rel_err(out, reference) < 1e-4, skip_type


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
def test_first_order_solvers_are_ddim(schedule_name):
    """The first-order exponential integrators (data and noise prediction) and AB1 in (x / alpha,
    sigma / alpha) are all DDIM: equal to rounding (so consistency of dpm_solver++ 1 covers them);
    on ve, euler in sigma is DDIM too."""
    model, x_t = gmm_problem(schedule_name)
    t = get_discretization("logSNR", model.schedule, 200)
    run = functools.partial(solve, model_fn=model.noise_fn, schedule=model.schedule, x=x_t, t=t, order=1)
    ddim = run("dpm_solver++")
    for name in ("ipndm", "dpm_solver") + (("euler",) if schedule_name == "ve" else ()):
        assert rel_err(run(name), ddim) < 1e-12, name


def test_reference_ode_is_accurate():
    """The scipy reference agrees with a high-order solver at many steps (a check of the check)."""
    for schedule_name in SCHEDULE_NAMES:
        model, x_t = gmm_problem(schedule_name)
        t = get_discretization("logSNR", model.schedule, 1000)
        with torch.no_grad():
            out = solve("uni_pc", model.noise_fn, model.schedule, x_t, t, order=3, lower_order_final=False)
        assert rel_err(out, gmm_reference_solution(schedule_name)) < 1e-7


# --------------------------------------------------------------------------- gradients
def _gradient_grid(schedule_name: str, sch, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t and a shifted t'. For vp_discrete (log alpha piecewise linear in t) the interior points sit
    mid-way between the knots, so that finite differences stay on one linear piece."""
    t = get_discretization("edm", sch, steps)
    sign = torch.tensor([(-1.0) ** i for i in range(steps + 1)], **F64)
    if schedule_name == "vp_discrete":
        n = sch.N
        t[1:-1] = (torch.floor(t[1:-1] * n) + 0.5) / n
        tp = t + 0.1 / n * sign
        tp[0] = t[0] - 0.1 / n
    else:
        tp = t * (1 + 0.02 * sign)
    return t, tp


def _fd_step(schedule_name: str, v: torch.Tensor) -> torch.Tensor:
    return torch.full_like(v, 1e-7) if schedule_name == "vp_discrete" else 1e-6 * v


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("name,order,opts", ALL_CONFIGS, ids=[_cfg_id(c) for c in ALL_CONFIGS])
def test_gradients_match_finite_differences(schedule_name, name, order, opts):
    """d(final sample)/d t_i and d/d t'_i by autograd equal central differences (S = 5)."""
    model, x_all = gmm_problem(schedule_name)
    x_t = x_all[:2]
    sch = model.schedule
    t, tp = _gradient_grid(schedule_name, sch, 5)
    weights = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3), **F64)

    def loss(t_, tp_):
        return (weights * solve(name, model.noise_fn, sch, x_t, t_, tp_, order=order, **opts)).sum()

    t_var, tp_var = t.clone().requires_grad_(True), tp.clone().requires_grad_(True)
    grad_t, grad_tp = torch.autograd.grad(loss(t_var, tp_var), (t_var, tp_var))
    for which, grad in (("t", grad_t), ("t'", grad_tp)):
        fd = torch.zeros_like(grad)
        steps = _fd_step(schedule_name, t if which == "t" else tp)
        with torch.no_grad():
            for i in range(len(t)):
                e = torch.zeros_like(t)
                e[i] = steps[i]
                if which == "t":
                    fd[i] = (loss(t + e, tp) - loss(t - e, tp)) / (2 * steps[i])
                else:
                    fd[i] = (loss(t, tp + e) - loss(t, tp - e)) / (2 * steps[i])
        scale = grad.abs().max()
        assert scale > 0
        assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-6 * float(scale)), (which, grad, fd)
    # the network is never called at t'_S
    assert float(grad_tp[-1]) == 0.0


# --------------------------------------------------------------------------- network calls
class Recorder:
    """Wraps a model function; records the time of every call."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, x, t, cond=None, uc=None):
        t = torch.as_tensor(t)
        assert t.ndim == 0 or bool((t == t.reshape(-1)[0]).all())
        self.times.append(float(t.reshape(-1)[0]))
        return self.fn(x, t, cond, uc)


NFE_TABLE = {  # spec section 3: NFE for S steps
    "euler": lambda s: s, "heun": lambda s: 2 * s - 1, "dpm_solver++": lambda s: s,
    "uni_pc": lambda s: s, "ipndm": lambda s: s, "dpm_solver": lambda s: s,
}


def test_steps_for_nfe():
    heun = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 9: 5, 10: 5, 11: 6}
    for nfe, s in heun.items():
        assert steps_for_nfe("heun", nfe) == s
        assert nfe_of("heun", s) == 2 * s - 1 <= nfe
    for name in SOLVERS:
        if name != "heun":
            for nfe in range(1, 13):
                assert steps_for_nfe(name, nfe) == nfe and nfe_of(name, nfe) == nfe
    with pytest.raises(ValueError):
        steps_for_nfe("uni_pc", 0)
    with pytest.raises(ValueError, match="solver"):
        steps_for_nfe("no_such_solver", 5)


@pytest.mark.parametrize("name,order,opts", ALL_CONFIGS, ids=[_cfg_id(c) for c in ALL_CONFIGS])
def test_network_calls(name, order, opts):
    """Exactly the NFE of the spec's table (heun: 2S - 1, an even budget runs one call short)."""
    net = wide_gaussian("ve")
    x_t = gaussian_start(net, 2)
    for nfe in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]:
        s = steps_for_nfe(name, nfe)
        rec = Recorder(net)
        solve(name, rec, net.schedule, x_t, get_discretization("edm", net.schedule, s), order=order, **opts)
        assert len(rec.times) == NFE_TABLE[name](s), (nfe, s, len(rec.times))
        assert len(rec.times) == (nfe - 1 if name == "heun" and nfe % 2 == 0 else nfe)


def test_step_orders():
    assert step_orders(5, 3, True) == [1, 2, 3, 2, 1]
    assert step_orders(5, 3, False) == [1, 2, 3, 3, 3]
    assert step_orders(2, 3, True) == [1, 1]
    assert step_orders(6, 4, False) == [1, 2, 3, 4, 4, 4]
    assert step_orders(1, 2, False) == [1]
    # DPM-Solver's 'fast' split of the NFE budget
    assert singlestep_orders(3, 3) == [2, 1]
    assert singlestep_orders(4, 3) == [3, 1]
    assert singlestep_orders(5, 3) == [3, 2]
    assert singlestep_orders(6, 3) == [3, 2, 1]
    assert singlestep_orders(5, 2) == [2, 2, 1]
    assert singlestep_orders(4, 1) == [1, 1, 1, 1]
    for nfe in range(1, 30):
        for order in (1, 2, 3):
            orders = singlestep_orders(nfe, order)
            assert sum(orders) == nfe and max(orders) <= order


# --------------------------------------------------------------------------- decoupled times t'
def _shifted(sch, t: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    tp = t * (1 + 0.05 * torch.rand(t.shape, generator=g, **F64))
    return tp.clamp(max=sch.T)


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("name,order,opts", ALL_CONFIGS, ids=[_cfg_id(c) for c in ALL_CONFIGS])
def test_t_prime_equal_to_t_is_bit_identical(schedule_name, name, order, opts):
    model, x_t = gmm_problem(schedule_name)
    t = get_discretization("edm", model.schedule, 6)
    a = solve(name, model.noise_fn, model.schedule, x_t, t, order=order, **opts)
    b = solve(name, model.noise_fn, model.schedule, x_t, t, t.clone(), order=order, **opts)
    assert torch.equal(a, b)


def _expected_call_times(name: str, order: int, tp: list[float]) -> list[float]:
    s = len(tp) - 1
    if name == "heun":  # step i calls at t'_i and (except the last step) at t'_{i+1}
        return [tp[0]] + [tp[j] for j in range(1, s) for _ in range(2)]
    return tp[:s]  # multistep and singlestep: t'_0 ... t'_{S-1} in order, never t'_S


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("name,order,opts", ALL_CONFIGS, ids=[_cfg_id(c) for c in ALL_CONFIGS])
def test_t_prime_only_moves_the_network_times(schedule_name, name, order, opts):
    """(1) The network is called at t' in order. (2) The step coefficients still come from t, and the
    data prediction of a network output at t' from t' (the paper's ``data_prediction_fn(x, t2)``):
    with a model warped in time, and t' = phi(t), the result equals the plain model's with t' = t.
    The warped model gives at tau the plain model's noise prediction at phi^-1(tau) (noise-prediction
    solvers), or the plain model's data prediction there (DPM-Solver++ and UniPC, which use
    x0 = (x - sigma(t') eps) / alpha(t')). (3) A shifted t' with the plain model does change the result."""
    model, x_t = gmm_problem(schedule_name)
    sch = model.schedule
    t = get_discretization("edm", sch, 6)
    tp = _shifted(sch, t)
    rec = Recorder(model.noise_fn)
    shifted = solve(name, rec, sch, x_t, t, tp, order=order, **opts)
    assert rec.times == _expected_call_times(name, order, tp.tolist())

    if schedule_name == "ve":
        phi, phi_inv = (lambda u: 1.05 * u), (lambda u: u / 1.05)
    else:
        phi, phi_inv = (lambda u: 0.9 * u + 0.05), (lambda u: (u - 0.05) / 0.9)

    def warped(x, tau, cond=None, uc=None):
        eps = model.noise_fn(x, phi_inv(tau), cond, uc)
        if name not in ("dpm_solver++", "uni_pc"):
            return eps
        u = phi_inv(tau).reshape(-1, 1, 1, 1)
        x0 = (x - sch.sigma(u) * eps) / sch.alpha(u)  # the plain model's data prediction at phi^-1(tau)
        tau = tau.reshape(-1, 1, 1, 1)
        return (x - sch.alpha(tau) * x0) / sch.sigma(tau)

    plain = solve(name, model.noise_fn, sch, x_t, t, order=order, **opts)
    via_warp = solve(name, warped, sch, x_t, t, phi(t), order=order, **opts)
    assert torch.allclose(via_warp, plain, rtol=1e-12, atol=1e-12 * float(plain.abs().max()))
    assert rel_err(shifted, plain) > 1e-6


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("name,order,opts", ALL_CONFIGS, ids=[_cfg_id(c) for c in ALL_CONFIGS])
def test_batch_equals_single_samples(schedule_name, name, order, opts):
    model, _ = gmm_problem(schedule_name)
    sch = model.schedule
    x_t = sch.prior(torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(5), **F64))
    t = get_discretization("edm", sch, 6)
    tp = _shifted(sch, t)
    batch = solve(name, model.noise_fn, sch, x_t, t, tp, order=order, **opts)
    singles = torch.cat([solve(name, model.noise_fn, sch, x_t[i:i + 1], t, tp, order=order, **opts)
                         for i in range(8)])
    assert torch.allclose(batch, singles, rtol=1e-12, atol=1e-12)
    assert not batch.requires_grad  # no autograd graph unless an input asks for one


# --------------------------------------------------------------------------- reference implementation
@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpm_solver_pp_2m_matches_plain_reference(schedule_name, lower_order_final):
    """samplers/reference.py's loop straight from DPM-Solver++'s Algorithm 2 agrees to 1e-12."""
    model, x_t = gmm_problem(schedule_name)
    sch = model.schedule
    for steps in (1, 2, 3, 6, 12):
        for skip in ("edm", "logSNR", "time_uniform"):
            t = get_discretization(skip, sch, steps)
            fast = solve("dpm_solver++", model.noise_fn, sch, x_t, t, order=2,
                         lower_order_final=lower_order_final)
            ref = dpm_solver_pp_2m(model.noise_fn, sch, x_t, t, lower_order_final=lower_order_final)
            assert rel_err(fast, ref) < 1e-12, (steps, skip)


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
def test_dpm_solver_pp_steps_match_exponential_integrator_definition(schedule_name):
    """The 1M and 3M steps equal the exact integral of the interpolating polynomial of the data
    predictions (reference.exponential_integrator_step, Gauss-Legendre) on non-uniform histories."""
    net = wide_gaussian(schedule_name)
    sch = net.schedule
    x_start = gaussian_start(net)
    for lams in ([-0.4, 0.35, 0.6, 1.3], [-1.0, 0.2, 0.3, 2.5], [0.0, 0.01, 0.02, 0.03]):
        t = sch.t_of_lambda(torch.tensor(lams, **F64))
        xs = [net.exact_solution(x_start, sch.T, ti) for ti in t]
        g = Solve.start(net, sch, x_start, t)
        ms = [g.x0(xs[j], g.eps(xs[j], j), j) for j in range(3)]
        for k in (1, 3):
            fast = dpm_solver_pp_step(g, xs[2], ms, 2, k)
            ref = exponential_integrator_step(xs[2], ms[::-1][:k], [float(g.lam[2 - j]) for j in range(k)],
                                              float(g.lam[3]), float(g.alpha[3]), float(g.sigma[2]),
                                              float(g.sigma[3]))
            assert rel_err(fast, ref) < 1e-12, (lams, k)


# --------------------------------------------------------------------------- argument checks
def test_bad_arguments_are_rejected():
    net = wide_gaussian("ve")
    x_t = gaussian_start(net, 1)
    t = get_discretization("edm", net.schedule, 4)
    for name in SOLVERS:
        info = SOLVERS[name]
        with pytest.raises(ValueError, match="order"):
            solve(name, net, net.schedule, x_t, t, order=info.max_order + 1)
        with pytest.raises(ValueError, match="t"):
            solve(name, net, net.schedule, x_t, t[:1])
        with pytest.raises(ValueError, match="t_prime"):
            solve(name, net, net.schedule, x_t, t, t[:-1])
    with pytest.raises(ValueError, match="variant"):
        solve("uni_pc", net, net.schedule, x_t, t, variant="bh3")
    with pytest.raises(ValueError, match="solver_name"):
        solve("rk45", net, net.schedule, x_t, t)


# --------------------------------------------------------------------------- grids: checks, a final t = 0
@pytest.mark.parametrize("name,order,opts", ALL_CONFIGS, ids=[_cfg_id(c) for c in ALL_CONFIGS])
def test_grid_ending_at_zero_needs_and_gets_a_final_denoising_step(name, order, opts):
    """k-diffusion's sigmas end at 0: without final_denoise that is an error (not NaN); with it the solve
    stops at the last nonzero time and returns the data prediction there (one more call)."""
    net = wide_gaussian("ve")
    sch, x = net.schedule, gaussian_start(net, 2)
    t = get_discretization("edm", sch, 6).to(torch.float64)
    t0 = torch.cat([t[:-1], t.new_zeros(1)])
    with pytest.raises(ValueError, match="final_denoise"):
        solve(name, net, sch, x, t0, order=order, **opts)
    rec = Recorder(net)
    out = solve(name, rec, sch, x, t0, order=order, final_denoise=True, **opts)
    assert len(rec.times) == NFE_TABLE[name](5) + 1 and rec.times[-1] == pytest.approx(float(t[-2]))
    ref = solve(name, net, sch, x, t[:-1], order=order, **opts)
    last = t[-2]
    x0 = (ref - sch.sigma(last) * net(ref, last.expand(2))) / sch.alpha(last)
    assert torch.isfinite(out).all() and torch.allclose(out, x0, rtol=0, atol=1e-12)
    # on a grid ending at t_min > 0 the option adds the data prediction at t_min
    out = solve(name, net, sch, x, t, order=order, final_denoise=True, **opts)
    full = solve(name, net, sch, x, t, order=order, **opts)
    assert torch.allclose(out, (full - sch.sigma(t[-1]) * net(full, t[-1].expand(2))) / sch.alpha(t[-1]))


@pytest.mark.parametrize("bad,what", [
    ([80.0, 10.0, 10.0, 0.002], "decrease strictly"),
    ([80.0, 1.0, 5.0, 0.002], "decrease strictly"),
    ([80.0, float("nan"), 1.0, 0.002], "finite"),
    ([80.0, 1.0, 0.5, -0.1], "> 0"),
])
def test_bad_grids_are_errors(bad, what):
    net = wide_gaussian("ve")
    with pytest.raises(ValueError, match=what):
        solve("uni_pc", net, net.schedule, gaussian_start(net, 2), torch.tensor(bad, **F64))
