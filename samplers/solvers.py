"""ODE solvers for diffusion models, differentiable in x, t and the decoupled network times t'.

Every solver has the signature

    solver(model_fn, schedule, x, t, t_prime=None, *, order, cond=None, uc=None, **options)

- ``model_fn(x, t, cond, uc)`` returns the noise prediction eps(x, t);
- ``t``: 1-D tensor of S + 1 strictly decreasing times (T ... t_min), shared by the batch;
- ``t_prime``: the times given to the network (default ``t``); the update coefficients
  (step sizes in lambda, alpha, sigma) always use ``t``;
- ``x``: x_T, the state at ``t[0]`` (already transformed by ``schedule.prior``).

Notation: alpha_i, sigma_i, lambda_i = log(alpha_i / sigma_i) at t_i, h_i = lambda_{i+1} - lambda_i,
eps_i the network output at (x_i, t'_i), x0_i = (x_i - sigma_i eps_i) / alpha_i the data prediction.

Each solver calls the network exactly NFE times (table in ``SOLVERS``): multistep solvers
reuse past outputs, and nothing is evaluated after the last step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from samplers.schedules import NoiseSchedule


# --------------------------------------------------------------------------- helpers
class Grid:
    """alpha, sigma, lambda at every t_i, and the network call at t'_i.

    The one-step update functions (``*_step``) take a ``Grid`` so that a test can start a single
    update from any state and history; the solvers are loops over them.
    """

    def __init__(self, model_fn, schedule: NoiseSchedule, x: Tensor, t: Tensor, t_prime: Tensor | None,
                 cond: Any, uc: Any):
        if t.ndim != 1 or t.numel() < 2:
            raise ValueError(f"t must be a 1-D tensor of S + 1 >= 2 times, got shape {tuple(t.shape)}")
        self.t = t.to(device=x.device, dtype=x.dtype)
        self.tp = self.t if t_prime is None else t_prime.to(device=x.device, dtype=x.dtype)
        if self.tp.shape != self.t.shape:
            raise ValueError(f"t_prime has shape {tuple(self.tp.shape)}, t has {tuple(self.t.shape)}")
        self.schedule = schedule
        self.batch = x.shape[0]
        self.steps = self.t.numel() - 1
        alpha, sigma = schedule.alpha(self.t), schedule.sigma(self.t)
        # Per-point scalars as tuples (one unbind each): indexing a tuple costs no autograd node,
        # where indexing a tensor adds a select (and a zeros + copy in backward) at every use.
        self.alpha, self.sigma = alpha.unbind(), sigma.unbind()
        self.lam = schedule.lambda_(self.t).unbind()
        self.s = (sigma / alpha).unbind()  # EDM noise level sigma/alpha
        self.t, self.tp = self.t.unbind(), self.tp.unbind()
        self.model_fn, self.cond, self.uc = model_fn, cond, uc

    def eps(self, x: Tensor, i: int) -> Tensor:
        """Noise prediction at (x, t'_i)."""
        return self.model_fn(x, self.tp[i].expand(self.batch), self.cond, self.uc)

    def x0(self, x: Tensor, eps: Tensor, i: int) -> Tensor:
        """Data prediction (x - sigma_i eps) / alpha_i, with t_i's coefficients."""
        return (x - self.sigma[i] * eps) / self.alpha[i]

    def drift(self, x: Tensor, eps: Tensor, i: int) -> Tensor:
        """Probability-flow ODE: dx/dt = f(t) x + g(t) eps."""
        f, g = self.schedule.ode_coefficients(self.t[i])
        return f * x + g * eps


def step_orders(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """Order used at each of the S steps of a multistep method.

    Warm-up: step i (0-based) has only i + 1 outputs available, so order min(order, i + 1).
    ``lower_order_final``: the last steps use min(order, S - i) (as DPM-Solver / UniPC codes).
    """
    orders = []
    for i in range(steps):
        k = min(order, i + 1)
        if lower_order_final:
            k = min(k, steps - i)
        orders.append(k)
    return orders


# --------------------------------------------------------------------------- euler / heun
def euler(model_fn, schedule, x, t, t_prime=None, *, order=1, cond=None, uc=None, **_):
    """Euler on the probability-flow ODE in the schedule's time.

    x_{i+1} = x_i + (t_{i+1} - t_i) [f(t_i) x_i + g(t_i) eps(x_i, t'_i)],
    f = d log alpha / dt, g = d sigma / dt - sigma f   (for VE: dx/dsigma = eps).
    NFE = S.
    """
    g_ = Grid(model_fn, schedule, x, t, t_prime, cond, uc)
    for i in range(g_.steps):
        x = x + (g_.t[i + 1] - g_.t[i]) * g_.drift(x, g_.eps(x, i), i)
    return x


def heun_step(g: Grid, x: Tensor, i: int, final: bool = False) -> Tensor:
    """One Heun step from x_i at t_i to t_{i+1} (plain Euler when ``final``); 2 network calls, 1 if final.

    In Karras et al.'s variables y = x / alpha, s = sigma / alpha (EDM noise level), dy/ds = eps:
      y~ = y_i + (s_{i+1} - s_i) eps(x_i, t'_i)
      y_{i+1} = y_i + (s_{i+1} - s_i) (eps(x_i, t'_i) + eps(alpha_{i+1} y~, t'_{i+1})) / 2.
    """
    a = g.alpha
    ds = g.sigma[i + 1] / a[i + 1] - g.sigma[i] / a[i]
    y = x / a[i]
    d = g.eps(x, i)
    y_euler = y + ds * d
    if final:
        return a[i + 1] * y_euler
    d2 = g.eps(a[i + 1] * y_euler, i + 1)
    return a[i + 1] * (y + ds * 0.5 * (d + d2))


def heun(model_fn, schedule, x, t, t_prime=None, *, order=2, cond=None, uc=None, **_):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step is plain Euler.

    Integrates dy/ds = eps(alpha y, t) in y = x / alpha and the EDM noise level s = sigma / alpha
    (for VE: y = x, s = t = sigma, exactly Karras et al.'s sampler):
      d_i = eps(x_i, t'_i); y~ = y_i + (s_{i+1} - s_i) d_i;
      y_{i+1} = y_i + (s_{i+1} - s_i) (d_i + eps(alpha_{i+1} y~, t'_{i+1})) / 2.
    Not in the schedule's time t: for ``vp_discrete`` (piecewise-linear log alpha in t) the ODE in t
    has kinks at every training step and Heun in t is not second order there. NFE = 2S - 1.
    """
    g_ = Grid(model_fn, schedule, x, t, t_prime, cond, uc)
    for i in range(g_.steps):
        x = heun_step(g_, x, i, final=i == g_.steps - 1)
    return x


# --------------------------------------------------------------------------- DPM-Solver++ (multistep)
def dpm_solver_pp_step(g: Grid, x: Tensor, ms: list[Tensor], i: int, k: int) -> Tensor:
    """One DPM-Solver++ update of order k from x_i at t_i to t_{i+1}.

    ``ms`` ends with the data predictions ..., m_{i-1}, m_i (at least k of them). No network call.
    """
    lam = g.lam
    h = lam[i + 1] - lam[i]
    phi_1 = torch.expm1(-h)
    x_new = (g.sigma[i + 1] / g.sigma[i]) * x - g.alpha[i + 1] * phi_1 * ms[-1]
    if k == 2:
        r0 = (lam[i] - lam[i - 1]) / h
        d1 = (ms[-1] - ms[-2]) / r0
        x_new = x_new - 0.5 * g.alpha[i + 1] * phi_1 * d1
    elif k == 3:
        r0 = (lam[i] - lam[i - 1]) / h
        r1 = (lam[i - 1] - lam[i - 2]) / h
        d1_0 = (ms[-1] - ms[-2]) / r0
        d1_1 = (ms[-2] - ms[-3]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 m''; the reference code lacks the 2 (see docstring)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        x_new = x_new + g.alpha[i + 1] * phi_2 * d1 - g.alpha[i + 1] * phi_3 * d2
    return x_new


def dpm_solver_pp(model_fn, schedule, x, t, t_prime=None, *, order=3, cond=None, uc=None,
                  lower_order_final=True, **_):
    """DPM-Solver++ multistep (1M/2M/3M), data prediction, exponential integrator.

    With m_j = x0_j, h = lambda_{i+1} - lambda_i, phi_1 = e^{-h} - 1:
      order 1: x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} phi_1 m_i
      order 2: ... - 0.5 alpha_{i+1} phi_1 D1,  D1 = (m_i - m_{i-1}) / r0,  r0 = h_{i-1} / h
      order 3: x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} phi_1 m_i + alpha_{i+1} phi_2 D1
               - alpha_{i+1} phi_3 D2, phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2,
               D1_0 = (m_i - m_{i-1})/r0, D1_1 = (m_{i-1} - m_{i-2})/r1,
               D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1) ~ h m',  D2 = 2 (D1_0 - D1_1)/(r0 + r1) ~ h^2 m''.
    (The term alpha phi_3 D2 integrates m'' tau^2 / 2 and needs D2 ~ h^2 m''. DPM-Solver's reference
    code (and code copied from it) uses D2 = (D1_0 - D1_1)/(r0 + r1) ~ h^2 m'' / 2, which leaves a
    local error -h^3 m'' / 12: its 3M step is only locally third order, globally second. With the
    factor 2 the step is the exponential integrator of the quadratic through m_{i-2}, m_{i-1}, m_i,
    locally O(h^4) (tests/test_solvers.py::test_local_order).)
    NFE = S.
    """
    if not 1 <= order <= 3:
        raise ValueError(f"dpm_solver++ supports orders 1-3, got {order}")
    g_ = Grid(model_fn, schedule, x, t, t_prime, cond, uc)
    ms: list[Tensor] = []
    for i, k in enumerate(step_orders(g_.steps, order, lower_order_final)):
        ms.append(g_.x0(x, g_.eps(x, i), i))
        ms = ms[-3:]
        x = dpm_solver_pp_step(g_, x, ms, i, k)
    return x


# --------------------------------------------------------------------------- UniPC
def _unipc_coefficients(rks: Tensor, h: Tensor, variant: str) -> tuple[Tensor, Tensor, Tensor]:
    """UniPC's linear system (Zhao et al. 2023, data prediction, hh = -h).

    R[p, j] = rks[j]^p, b[p] = phi_{p+2}(hh) (p+1)! / B(h) with phi_{k+1} = phi_k / hh - 1/k!,
    B(h) = hh (bh1) or e^{hh} - 1 (bh2). Returns (R, b, B_h).
    """
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k = h_phi_1 / hh - 1.0
    fact = 1
    rows, bs = [], []
    for p in range(1, rks.numel() + 1):
        rows.append(rks ** (p - 1))
        bs.append(h_phi_k * fact / b_h)
        fact *= p + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return torch.stack(rows), torch.stack(bs), b_h


def uni_pc_step(g: Grid, x: Tensor, ms: list[Tensor], i: int, k: int, variant: str = "bh2",
                corrector: bool = True) -> tuple[Tensor, Tensor | None]:
    """One UniPC update of order k from x_i at t_i to t_{i+1}; ``ms`` ends with ..., m_{i-1}, m_i.

    With ``corrector``: one network call at the predicted x_{i+1}; returns the corrected x_{i+1}
    and m_{i+1} = x0(x_pred, t'_{i+1}) (the next step's history). Without: (x_pred, None), no call.
    """
    lam = g.lam
    h = lam[i + 1] - lam[i]
    rks = [(lam[i - j] - lam[i]) / h for j in range(1, k)]
    d1s = [(ms[-1 - j] - ms[-1]) / rks[j - 1] for j in range(1, k)]
    rks_t = torch.stack(rks + [torch.ones_like(h)])
    R, b, b_h = _unipc_coefficients(rks_t, h, variant)
    x_tilde = (g.sigma[i + 1] / g.sigma[i]) * x - g.alpha[i + 1] * torch.expm1(-h) * ms[-1]
    x_pred = x_tilde
    if k >= 2:
        rho_p = torch.full_like(h, 0.5).reshape(1) if k == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        x_pred = x_tilde - g.alpha[i + 1] * b_h * sum(rho_p[j] * d1s[j] for j in range(k - 1))
    if not corrector:
        return x_pred, None
    m_next = g.x0(x_pred, g.eps(x_pred, i + 1), i + 1)
    rho_c = torch.full_like(h, 0.5).reshape(1) if k == 1 else torch.linalg.solve(R, b)
    corr = rho_c[-1] * (m_next - ms[-1])
    for j in range(k - 1):
        corr = corr + rho_c[j] * d1s[j]
    return x_tilde - g.alpha[i + 1] * b_h * corr, m_next


def uni_pc(model_fn, schedule, x, t, t_prime=None, *, order=3, cond=None, uc=None, variant="bh2",
           lower_order_final=True, **_):
    """UniPC multistep predictor-corrector (UniP-k + UniC), data prediction.

    Step i of order k, h = lambda_{i+1} - lambda_i, r_j = (lambda_{i-j} - lambda_i) / h,
    D_j = (m_{i-j} - m_i) / r_j (j = 1..k-1), phi_1 = e^{-h} - 1:
      x~ = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} phi_1 m_i
      predictor: x_{i+1} = x~ - alpha_{i+1} B(h) sum_j rho^p_j D_j  (rho^p from R[:-1,:-1] rho = b[:-1];
                 rho^p = 1/2 when k = 2)
      corrector (uses m_{i+1} = x0(x_{i+1}, t'_{i+1}), which the next step reuses):
                 x^c_{i+1} = x~ - alpha_{i+1} B(h) (sum_j rho^c_j D_j + rho^c_k (m_{i+1} - m_i))
                 (rho^c from R rho = b; rho^c = 1/2 when k = 1).
    No corrector after the last step. NFE = S. Variants: B(h) = -h (bh1), e^{-h} - 1 (bh2).
    """
    if not 1 <= order <= 3:
        raise ValueError(f"uni_pc supports orders 1-3, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; choose bh1 or bh2")
    g_ = Grid(model_fn, schedule, x, t, t_prime, cond, uc)
    ms = [g_.x0(x, g_.eps(x, 0), 0)]
    for i, k in enumerate(step_orders(g_.steps, order, lower_order_final)):
        last = i == g_.steps - 1
        x, m_next = uni_pc_step(g_, x, ms, i, k, variant, corrector=not last)
        if not last:
            ms = (ms + [m_next])[-3:]
    return x


# --------------------------------------------------------------------------- iPNDM
IPNDM_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm_step(g: Grid, y: Tensor, eps_hist: list[Tensor], i: int, k: int) -> Tensor:
    """One AB-k step in y = x / alpha, s = sigma / alpha from s_i to s_{i+1}; ``eps_hist`` newest first.

    y_{i+1} = y_i + (s_{i+1} - s_i) sum_j w^k_j eps_{i-j}. No network call.
    """
    d = sum(w * e for w, e in zip(IPNDM_WEIGHTS[k], eps_hist))
    return y + (g.s[i + 1] - g.s[i]) * d


def ipndm(model_fn, schedule, x, t, t_prime=None, *, order=4, cond=None, uc=None, lower_order_final=False, **_):
    """Improved PNDM (Zhang & Chen 2023): Adams-Bashforth on the noise prediction.

    In y = x / alpha and s = sigma / alpha (EDM noise level) the ODE is dy/ds = eps, and
    y_{i+1} = y_i + (s_{i+1} - s_i) sum_j w^k_j eps_{i-j}, with the fixed AB-k weights
    w^1 = 1, w^2 = (3, -1)/2, w^3 = (23, -16, 5)/12, w^4 = (55, -59, 37, -9)/24. NFE = S.
    """
    if not 1 <= order <= 4:
        raise ValueError(f"ipndm supports orders 1-4, got {order}")
    g_ = Grid(model_fn, schedule, x, t, t_prime, cond, uc)
    eps_hist: list[Tensor] = []
    y = x / g_.alpha[0]
    for i, k in enumerate(step_orders(g_.steps, order, lower_order_final)):
        x_i = x if i == 0 else g_.alpha[i] * y
        eps_hist = ([g_.eps(x_i, i)] + eps_hist)[:4]
        y = ipndm_step(g_, y, eps_hist, i, k)
    return g_.alpha[-1] * y


# --------------------------------------------------------------------------- DPM-Solver (singlestep)
def singlestep_orders(nfe: int, order: int) -> list[int]:
    """DPM-Solver's 'fast' split of an NFE budget into singlestep orders (they sum to NFE)."""
    if order == 3:
        k = nfe // 3 + 1
        if nfe % 3 == 0:
            return [3] * (k - 2) + [2, 1]
        if nfe % 3 == 1:
            return [3] * (k - 1) + [1]
        return [3] * (k - 1) + [2]
    if order == 2:
        return [2] * (nfe // 2) if nfe % 2 == 0 else [2] * (nfe // 2) + [1]
    return [1] * nfe


def dpm_solver_step(g: Grid, x: Tensor, p: int, k: int) -> Tensor:
    """One singlestep DPM-Solver step of order k from x at t_p to t_{p+k} (formulas in ``dpm_solver``).

    k network calls, at t'_p ... t'_{p+k-1}; the intermediate points are the grid's t_{p+1}, t_{p+2}.
    """
    a, sg, lam = g.alpha, g.sigma, g.lam
    q = p + k
    h = lam[q] - lam[p]
    phi_1 = torch.expm1(h)
    eps_s = g.eps(x, p)
    base = (a[q] / a[p]) * x - sg[q] * phi_1 * eps_s
    if k == 1:
        return base
    r1 = (lam[p + 1] - lam[p]) / h
    if k == 2:
        u = (a[p + 1] / a[p]) * x - sg[p + 1] * torch.expm1(r1 * h) * eps_s
        return base - sg[q] * phi_1 * (g.eps(u, p + 1) - eps_s) / (2.0 * r1)
    r2 = (lam[p + 2] - lam[p]) / h
    u1 = (a[p + 1] / a[p]) * x - sg[p + 1] * torch.expm1(r1 * h) * eps_s
    d_1 = (g.eps(u1, p + 1) - eps_s) / r1
    phi_12 = torch.expm1(r2 * h)
    u2 = (a[p + 2] / a[p]) * x - sg[p + 2] * phi_12 * eps_s \
        - sg[p + 2] * r2 * (phi_12 / (r2 * h) - 1.0) * d_1
    d_2 = (g.eps(u2, p + 2) - eps_s) / r2
    d1 = (r2 * d_1 - r1 * d_2) / (r2 - r1)
    d2 = 2.0 * (d_2 - d_1) / (r2 - r1)
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    return base - sg[q] * phi_2 * d1 - sg[q] * phi_3 * d2


def dpm_solver(model_fn, schedule, x, t, t_prime=None, *, order=3, cond=None, uc=None, **_):
    """Singlestep DPM-Solver (Lu et al. 2022), noise prediction.

    The S = NFE intervals of ``t`` are grouped into steps of orders ``singlestep_orders(S, order)``;
    a step of order k from s = t_p to t = t_{p+k} evaluates the network at t_p ... t_{p+k-1}
    (r_j = (lambda_{p+j} - lambda_s) / h). With phi_1(h) = e^h - 1:
      order 1: x_t = (alpha_t/alpha_s) x_s - sigma_t phi_1(h) eps_s
      order 2: u = (alpha_1/alpha_s) x_s - sigma_1 phi_1(r1 h) eps_s;
               x_t = (alpha_t/alpha_s) x_s - sigma_t phi_1(h) eps_s - sigma_t phi_1(h) (eps_1 - eps_s) / (2 r1)
      order 3: u1 as u; u2 = (alpha_2/alpha_s) x_s - sigma_2 phi_1(r2 h) eps_s
                   - sigma_2 (r2/r1) (phi_1(r2 h)/(r2 h) - 1) (eps_1 - eps_s);
               x_t = (alpha_t/alpha_s) x_s - sigma_t phi_1 eps_s - sigma_t phi_2 D1 - sigma_t phi_3 D2,
               phi_2 = phi_1/h - 1, phi_3 = phi_2/h - 1/2, Dj = (eps_j - eps_s)/r_j,
               D1 = (r2 Dj1 - r1 Dj2)/(r2 - r1), D2 = 2 (Dj2 - Dj1)/(r2 - r1)
    The order-3 step is third order (local error O(h^4)) only when r2 = 2/3, whatever r1: eps(u1),
    u1 being a first-order state (error O(h^2)), enters x_t with the weight
    sigma_t (r2 phi_2 - 2 phi_3) / (r2 - r1), which is O(h^2) only then; otherwise the step is
    locally O(h^3). With r1 = 1/3, r2 = 2/3 (the logSNR grid) it is DPM-Solver-3. The intermediate
    points are the grid's own points, so a learned or non-logSNR grid gets the lower local order.
    NFE = S.
    """
    if not 1 <= order <= 3:
        raise ValueError(f"dpm_solver supports orders 1-3, got {order}")
    g_ = Grid(model_fn, schedule, x, t, t_prime, cond, uc)
    p = 0
    for k in singlestep_orders(g_.steps, order):
        x = dpm_solver_step(g_, x, p, k)
        p += k
    return x


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SolverInfo:
    name: str
    fn: Callable
    min_order: int
    max_order: int
    default_order: int
    steps_for_nfe: Callable[[int], int]
    nfe_for_steps: Callable[[int], int]


SOLVERS: dict[str, SolverInfo] = {
    "euler": SolverInfo("euler", euler, 1, 1, 1, lambda n: n, lambda s: s),
    "heun": SolverInfo("heun", heun, 2, 2, 2, lambda n: (n + 1) // 2, lambda s: 2 * s - 1),
    "dpm_solver++": SolverInfo("dpm_solver++", dpm_solver_pp, 1, 3, 3, lambda n: n, lambda s: s),
    "uni_pc": SolverInfo("uni_pc", uni_pc, 1, 3, 3, lambda n: n, lambda s: s),
    "ipndm": SolverInfo("ipndm", ipndm, 1, 4, 4, lambda n: n, lambda s: s),
    "dpm_solver": SolverInfo("dpm_solver", dpm_solver, 1, 3, 3, lambda n: n, lambda s: s),
}


def get_solver(name: str) -> SolverInfo:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver_name {name!r}; choose from {', '.join(SOLVERS)}")
    return SOLVERS[name]


def steps_for_nfe(name: str, nfe: int) -> int:
    """Number of intervals S of the discretization for an NFE budget (heun: NFE = 2S - 1 <= budget)."""
    if nfe < 1:
        raise ValueError(f"NFE must be >= 1, got {nfe}")
    return get_solver(name).steps_for_nfe(nfe)


def solve(name: str, model_fn, schedule: NoiseSchedule, x: Tensor, t: Tensor, t_prime: Tensor | None = None,
          *, order: int | None = None, cond: Any = None, uc: Any = None, **options) -> Tensor:
    """Run solver ``name`` from x = x_T along ``t`` (network at ``t_prime``).

    ``options`` are the solver's own keywords (``variant`` for uni_pc, ``lower_order_final`` for the
    multistep solvers); an option the solver does not have is an error, not silently ignored.
    """
    info = get_solver(name)
    order = info.default_order if order is None else int(order)
    if not info.min_order <= order <= info.max_order:
        raise ValueError(f"{name} supports orders {info.min_order}-{info.max_order}, got {order}")
    own = set(inspect.signature(info.fn).parameters) - {"model_fn", "schedule", "x", "t", "t_prime", "_"}
    unknown = sorted(set(options) - own)
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}; its options: {', '.join(sorted(own))}")
    return info.fn(model_fn, schedule, x, t, t_prime, order=order, cond=cond, uc=uc, **options)


def nfe_of(name: str, steps: int) -> int:
    return get_solver(name).nfe_for_steps(steps)


__all__ = ["solve", "get_solver", "steps_for_nfe", "nfe_of", "SOLVERS", "step_orders", "singlestep_orders",
           "euler", "heun", "dpm_solver_pp", "uni_pc", "ipndm", "dpm_solver", "Grid",
           "heun_step", "dpm_solver_pp_step", "uni_pc_step", "ipndm_step", "dpm_solver_step"]

