"""The paper code's solver arithmetic, for ``--paper_compat``: its numbers to float rounding.

The paper's code (vinhsuhi/LD3) computes every step coefficient from float32 times in float32
(lambda, h, phi functions, UniPC's ``linalg.solve``), multiplies them into float64 states (its
model wrapper returns float64 noise predictions), and rounds UniPC's correction sums to float32.
Those roundings move the outputs by up to 7e-5 on the digits mixture: more than the differences
this mode exists to remove. The solvers here follow that arithmetic, operation for operation in
the same precision, so that ``tests/test_paper_reference.py`` can hold them to 1e-5 against the
outputs the paper's code recorded (``tests/data/paper_reference``). Written from the update
formulas (the docstrings of ``samplers/solvers.py``); the fast solvers there are the default.

Same signature as the solvers of ``samplers/solvers.py``; differentiable in x, t and t'. They
differ from the paper's code only where it crashes or wastes work: no network call after the last
step, iPNDM of order 1 runs (the paper's raises IndexError), the singlestep ``dpm_solver`` (orders 1
and 2; the paper's code only runs it when called directly) reads our grid, which holds each step's
intermediate time, and heun is not here (broken in the paper's code; ``--paper_compat`` keeps ours).

``time_steps`` computes the paper's baseline grids (``ODESolver.get_time_steps``) in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ld3.samplers.schedules import NoiseSchedule, VESchedule
from ld3.samplers.solvers import singlestep_orders


def _model(model_fn, x: Tensor, t: Tensor, cond: Any, uc: Any) -> Tensor:
    """Noise prediction at one time (0-d), as the paper's wrapper returns it: float64."""
    return model_fn(x, t.expand(x.shape[0]), cond, uc).to(torch.float64)


def _x0(schedule: NoiseSchedule, model_fn, x: Tensor, t: Tensor, cond: Any, uc: Any) -> Tensor:
    """Data prediction (x - sigma(t) eps) / alpha(t), with t's float32 alpha and sigma."""
    eps = _model(model_fn, x, t, cond, uc)
    return (x - schedule.sigma(t) * eps) / schedule.alpha(t)


def _check(t: Tensor, t_prime: Tensor | None) -> Tensor:
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"t must be a 1-D tensor of S + 1 >= 2 times, got shape {tuple(t.shape)}")
    if t_prime is None:
        return t
    if t_prime.shape != t.shape:
        raise ValueError(f"t_prime has shape {tuple(t_prime.shape)}, t has {tuple(t.shape)}")
    return t_prime


def _orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """The paper's multistep orders: warm-up steps 1 .. order - 1 at their own number, later steps at
    ``order``, or min(order, S + 1 - step) with ``lower_order_final`` (unlike ``solvers.step_orders``, a
    warm-up step is not lowered when S < order)."""
    return [step if step < order else (min(order, steps + 1 - step) if lower_order_final else order)
            for step in range(1, steps + 1)]


def _as32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


# --------------------------------------------------------------------------- DPM-Solver++ (multistep)
def _dpmpp_update(sch: NoiseSchedule, x: Tensor, ms: list[Tensor], ts: list[Tensor], t: Tensor, k: int,
                  d2_factor: float = 1.0) -> Tensor:
    """Multistep DPM-Solver++ update of order k from ts[-1] to t; coefficients in float32.

    order 1: (sigma_t / sigma_0) x - (alpha_t phi_1) m_0,  phi_1 = e^{-h} - 1
    order 2: ... - 0.5 (alpha_t phi_1) D1_0,  D1_0 = (1 / r0) (m_0 - m_1)
    order 3: ... + (alpha_t phi_2) D1 - (alpha_t phi_3) D2,  D2 = (1 / (r0 + r1)) (D1_0 - D1_1)
    (``d2_factor`` 2: our exact 3M step, in the same arithmetic)
    """
    lam = sch.lambda_
    lam_t, lam_0 = lam(t), lam(ts[-1])
    h = lam_t - lam_0
    sigma_t, sigma_0 = sch.sigma(t), sch.sigma(ts[-1])
    alpha_t = torch.exp(sch.log_alpha(t))
    phi_1 = torch.expm1(-h)
    if k == 1:
        return sigma_t / sigma_0 * x - alpha_t * phi_1 * ms[-1]
    r0 = (lam_0 - lam(ts[-2])) / h
    d1_0 = (1.0 / r0) * (ms[-1] - ms[-2])
    if k == 2:
        return (sigma_t / sigma_0) * x - (alpha_t * phi_1) * ms[-1] - 0.5 * (alpha_t * phi_1) * d1_0
    r1 = (lam(ts[-2]) - lam(ts[-3])) / h
    d1_1 = (1.0 / r1) * (ms[-2] - ms[-3])
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d2_factor / (r0 + r1)) * (d1_0 - d1_1)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return ((sigma_t / sigma_0) * x - (alpha_t * phi_1) * ms[-1] + (alpha_t * phi_2) * d1
            - (alpha_t * phi_3) * d2)


def dpm_solver_pp(model_fn, schedule, x, t, t_prime=None, *, order=3, cond=None, uc=None,
                  lower_order_final=True, third_order="paper"):
    """DPM-Solver++ (1M/2M/3M) as the paper's code computes it (3M without the factor 2 on D2).

    Warm-up steps 1 .. order - 1 use orders 1 .. order - 1; later steps min(order, S + 1 - step)
    with ``lower_order_final``. ``third_order``: "paper" (its 3M step) or "exact" (ours, factor 2 on D2).
    """
    if third_order not in ("paper", "exact"):
        raise ValueError(f"third_order must be 'paper' or 'exact', got {third_order!r}")
    d2_factor = 1.0 if third_order == "paper" else 2.0
    tp = _as32(_check(t, t_prime))
    t = _as32(t)
    steps = t.numel() - 1
    ts, ms = [t[0]], [_x0(schedule, model_fn, x, tp[0], cond, uc)]
    for step, k in enumerate(_orders(steps, order, lower_order_final), start=1):
        t1, t2 = t[step], tp[step]  # indexed once per step, as the paper's code (gradients sum alike)
        x = _dpmpp_update(schedule, x, ms, ts, t1, k, d2_factor)
        if step < steps:  # the paper's code also evaluates after the last step, and drops the result
            ts, ms = (ts + [t1])[-order:], (ms + [_x0(schedule, model_fn, x, t2, cond, uc)])[-order:]
    return x


# --------------------------------------------------------------------------- UniPC
def _unipc_update(sch: NoiseSchedule, model_fn, x: Tensor, ms: list[Tensor], ts: list[Tensor], t: Tensor,
                  t2: Tensor, k: int, variant: str, corrector: bool, cond: Any, uc: Any):
    """UniPC-k update from ts[-1] to t as the paper's code computes it.

    rho from R rho = b (``linalg.solve`` in float32), R_pj = r_j^p (r_k = 1), b_p = h phi_{p+1}(hh) p! / B(h);
    the predictor's and corrector's sums over the history are taken in float64 and rounded to float32.
    Returns (x_{t}, m_t or None).
    """
    lam = sch.lambda_
    t, t2 = t.view(-1), t2.view(-1)
    lam_0 = lam(ts[-1])
    h = lam(t) - lam_0
    sigma_0, sigma_t = sch.sigma(ts[-1]), sch.sigma(t)
    alpha_t = torch.exp(sch.log_alpha(t))
    rks, d1s = [], []
    for i in range(1, k):
        rk = (lam(ts[-(i + 1)]) - lam_0) / h
        rks.append(rk.reshape(()))
        d1s.append((ms[-(i + 1)] - ms[-1]) / rk)
    # the paper's code builds these nodes with torch.tensor(rks): R carries no gradient
    rks = torch.stack(rks + [torch.ones((), dtype=h.dtype, device=h.device)]).detach()
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rows, b, fact = [], [], 1
    for i in range(1, k + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    big_r, b = torch.stack(rows), torch.cat(b)
    x_tilde = sigma_t / sigma_0 * x - alpha_t * h_phi_1 * ms[-1]
    d1 = torch.stack(d1s, 1) if d1s else None
    if d1 is not None:
        rho_p = (torch.full((1,), 0.5, dtype=b.dtype, device=b.device) if k == 2
                 else torch.linalg.solve(big_r[:-1, :-1], b[:-1]))
        x_new = x_tilde - alpha_t * b_h * torch.einsum("k,bk...->b...", rho_p.double(), d1.double()).float()
    else:
        x_new = x_tilde - alpha_t * b_h * 0
    if not corrector:
        return x_new, None
    rho_c = torch.full((1,), 0.5, dtype=b.dtype, device=b.device) if k == 1 else torch.linalg.solve(big_r, b)
    m_t = _x0(sch, model_fn, x_new, t2, cond, uc)
    corr = 0 if d1 is None else torch.einsum("k,bk...->b...", rho_c[:-1].double(), d1.double()).float()
    return x_tilde - alpha_t * b_h * (corr + rho_c[-1] * (m_t - ms[-1])), m_t


def uni_pc(model_fn, schedule, x, t, t_prime=None, *, order=3, cond=None, uc=None, variant="bh2",
           lower_order_final=True):
    """UniPC (predictor UniP-k, corrector UniC) as the paper's code computes it.

    Warm-up steps 1 .. order - 1 use orders 1 .. order - 1 with the corrector; later steps
    min(order, S + 1 - step) with ``lower_order_final``; no corrector at the last step.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; choose bh1 or bh2")
    tp = _as32(_check(t, t_prime))
    t = _as32(t)
    steps = t.numel() - 1
    ts, ms = [t[0]], [_x0(schedule, model_fn, x, tp[0], cond, uc)]
    for step, k in enumerate(_orders(steps, order, lower_order_final), start=1):
        t1, t2 = t[step], tp[step]  # indexed once per step, as the paper's code (gradients sum alike)
        corrector = step < order or step != steps
        x, m = _unipc_update(schedule, model_fn, x, ms, ts, t1, t2, k, variant, corrector, cond, uc)
        if step < steps:
            if m is None:
                m = _x0(schedule, model_fn, x, t2, cond, uc)
            ts, ms = (ts + [t1])[-order:], (ms + [m])[-order:]
    return x


# --------------------------------------------------------------------------- iPNDM, Euler
_AB = {1: ((1,), 1), 2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


def ipndm(model_fn, schedule, x, t, t_prime=None, *, order=4, cond=None, uc=None, lower_order_final=False):
    """iPNDM as the paper's code computes it: x' = (alpha_t / alpha_s) x - (sigma_t phi_1(h)) AB_k(eps),
    phi_1(h) = e^h - 1 in float32, the Adams-Bashforth sum in float64 with integer weights.

    Order min(order, step + 1); the paper's code has no lower-order final steps."""
    if lower_order_final:
        raise ValueError("the paper's iPNDM has no lower_order_final")
    tp = _as32(_check(t, t_prime))
    t = _as32(t)
    sch = schedule
    hist: list[Tensor] = []
    for step in range(t.numel() - 1):
        k = min(order, step + 1)
        s, tn = t[step], t[step + 1]  # (t_{step+1} is indexed again at the next step, as in the paper's code)
        eps = _model(model_fn, x, tp[step], cond, uc)
        h = sch.lambda_(tn) - sch.lambda_(s)
        weights, den = _AB[k]
        comb = weights[0] * eps
        for w, e in zip(weights[1:], reversed(hist)):
            comb = comb + w * e if w > 0 else comb - (-w) * e
        x = torch.exp(sch.log_alpha(tn) - sch.log_alpha(s)) * x - (sch.sigma(tn) * torch.expm1(h)) * (comb / den)
        hist = (hist + [eps])[-(order - 1):] if order > 1 else []
    return x


def euler(model_fn, schedule, x, t, t_prime=None, *, order=1, cond=None, uc=None):
    """Euler as the paper's code computes it: dx/dt = f(t) x + g(t)^2 / (2 sigma(t)) eps(x, t'), in float32
    coefficients (VE/EDM: f = 0, g = sqrt(2 t))."""
    tp = _as32(_check(t, t_prime))
    t = _as32(t)
    for step in range(t.numel() - 1):
        tc = t[step]
        eps = _model(model_fn, x, tp[step], cond, uc)
        if isinstance(schedule, VESchedule):
            d = 0.0 * x + torch.sqrt(2 * tc) ** 2 / (2 * schedule.sigma(tc)) * eps
        else:
            f, g = schedule.ode_coefficients(tc)
            d = f * x + g * eps
        x = x + (t[step + 1] - tc) * d
    return x


# --------------------------------------------------------------------------- DPM-Solver (singlestep)
def paper_midpoints(schedule: NoiseSchedule, outer: Tensor) -> Tensor:
    """The grid our ``dpm_solver`` reads for the paper's K outer times (order 2, r1 = r2 = 1/2): each
    step's intermediate time t(lambda_s + h / 2), computed as the paper's code does (float32)."""
    outer = _as32(outer)
    pts = [outer[:1]]
    for i in range(outer.numel() - 1):
        ls, lt = schedule.lambda_(outer[i]), schedule.lambda_(outer[i + 1])
        pts += [schedule.t_of_lambda(ls + 0.5 * (lt - ls)).reshape(1), outer[i + 1:i + 2]]
    return torch.cat(pts)


def dpm_solver(model_fn, schedule, x, t, t_prime=None, *, order=2, cond=None, uc=None):
    """Singlestep DPM-Solver-1/2 (noise prediction) as the paper's code computes it, coefficients in float32.

    Our grid convention (``samplers.solvers.dpm_solver``): S = NFE intervals, an order-2 step from t_p to
    t_{p+2} evaluates at t'_p and at its intermediate point t'_{p+1}; with the paper's outer times use
    ``paper_midpoints`` (its r1 = 1/2). The paper's code has no order 3 here (nor a working Generator path)."""
    if order not in (1, 2):
        raise ValueError(f"the paper's dpm_solver has orders 1 and 2, got {order}")

    tp = _as32(_check(t, t_prime))
    t = _as32(t)
    sch, p = schedule, 0
    for k in singlestep_orders(t.numel() - 1, order):
        s, q = t[p], t[p + k]
        h = sch.lambda_(q) - sch.lambda_(s)
        eps_s = _model(model_fn, x, tp[p], cond, uc)
        base = torch.exp(sch.log_alpha(q) - sch.log_alpha(s)) * x - (sch.sigma(q) * torch.expm1(h)) * eps_s
        if k == 2:
            mid = t[p + 1]
            r1 = (sch.lambda_(mid) - sch.lambda_(s)) / h
            if abs(float(r1) - 0.5) < 1e-5:  # the paper's midpoint (its fixed r1 = 1/2), not its rounding
                r1 = 0.5
            u = torch.exp(sch.log_alpha(mid) - sch.log_alpha(s)) * x - (sch.sigma(mid) * torch.expm1(r1 * h)) * eps_s
            eps_m = _model(model_fn, u, tp[p + 1], cond, uc)
            base = base - (0.5 / r1) * (sch.sigma(q) * torch.expm1(h)) * (eps_m - eps_s)
        x, p = base, p + k
    return x


PAPER_SOLVERS = {"uni_pc": uni_pc, "dpm_solver++": dpm_solver_pp, "ipndm": ipndm, "euler": euler,
                 "dpm_solver": dpm_solver}
PAPER_ORDERS = {"dpm_solver": (1, 2)}
"""Orders the paper's code has, for the solvers where it lacks some of ours (all orders elsewhere)."""
PAPER_LACKS = {"ipndm": {"lower_order_final": False}}
"""Options of ours that the paper's solver does not have, with the value it behaves as."""


def has_paper(name: str, order: int | None) -> bool:
    """Whether the paper's code has solver ``name`` at ``order`` (then ``--arithmetic paper`` runs it)."""
    return name in PAPER_SOLVERS and (name not in PAPER_ORDERS or order in PAPER_ORDERS[name])


# --------------------------------------------------------------------------- baseline grids
def time_steps(skip_type: str, schedule: NoiseSchedule, steps: int) -> Tensor:
    """The paper's baseline grid of ``steps`` intervals from T to t_min, in float32 as its code computes it.

    logSNR: lambda uniform; time_uniform: t uniform; time_quadratic: t_min + (T - t_min) ((S - i) / S)^2;
    edm: (s_max^(1/7) + i / S (s_min^(1/7) - s_max^(1/7)))^7 in sigma for VE models, in t for the others.
    """
    n, t_T, t_0 = steps, schedule.T, schedule.t_min
    f32 = torch.float32
    if skip_type == "logSNR":
        lam_T = float(schedule.lambda_(torch.tensor(t_T, dtype=f32)))
        lam_0 = float(schedule.lambda_(torch.tensor(t_0, dtype=f32)))
        return schedule.t_of_lambda(torch.linspace(lam_T, lam_0, n + 1, dtype=f32))
    if skip_type == "time_uniform":
        return torch.linspace(t_T, t_0, n + 1, dtype=f32)
    if skip_type == "time_quadratic":
        mono = torch.arange(0, n + 1).pow(2.0).to(f32)
        return (t_0 + (t_T - t_0) * (mono - mono.min()) / (mono.max() - mono.min())).flip(0)
    if skip_type == "edm":
        rho = 7.0
        ve = isinstance(schedule, VESchedule)
        s_min = torch.tensor(t_0, dtype=f32) if ve else t_0
        s_max = torch.tensor(t_T, dtype=f32) if ve else t_T
        ramp = torch.linspace(0, 1, n + 1, dtype=f32)
        lo, hi = s_min ** (1 / rho), s_max ** (1 / rho)
        return ((hi + ramp * (lo - hi)) ** rho).to(f32)
    raise ValueError(f"the paper's code has no skip_type {skip_type!r}")


__all__ = ["PAPER_SOLVERS", "PAPER_ORDERS", "PAPER_LACKS", "has_paper", "uni_pc", "dpm_solver_pp", "ipndm", "euler", "dpm_solver", "paper_midpoints",
           "time_steps"]
