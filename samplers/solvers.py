"""ODE solvers for diffusion models, differentiable in x, t and the decoupled network times t'.

Every solver has the signature

    solver(model_fn, schedule, x, t, t_prime=None, *, order, cond=None, uc=None, **options)

- ``model_fn(x, t, cond, uc)`` returns the noise prediction eps(x, t);
- ``t``: 1-D tensor of S + 1 strictly decreasing times (T ... t_min), shared by the batch, or a
  ``Grid`` (the times with their coefficient tables, shared by rollouts on the same times);
- ``t_prime``: the times given to the network (default ``t``); the update coefficients
  (step sizes in lambda, alpha, sigma) always use ``t``;
- ``x``: x_T, the state at ``t[0]`` (already transformed by ``schedule.prior``).

Notation: alpha_i, sigma_i, lambda_i = log(alpha_i / sigma_i) at t_i, h_i = lambda_{i+1} - lambda_i,
eps_i the network output at (x_i, t'_i), x0_i = (x_i - sigma'_i eps_i) / alpha'_i the data prediction,
where alpha'_i, sigma'_i are taken at t'_i, as in the paper's code (with t' = t: the usual x0).

Each solver calls the network exactly NFE times (table in ``SOLVERS``): multistep solvers
reuse past outputs, and nothing is evaluated after the last step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import torch
from torch import Tensor

from ld3.samplers.schedules import NoiseSchedule


# --------------------------------------------------------------------------- helpers
def combine(coefs: Tensor, tensors: list[Tensor]) -> Tensor:
    """sum_j coefs[0, j] tensors[j] as one matrix product; ``coefs`` is a 1 x k row.

    One autograd node (and one in backward) for the whole linear combination, where a chain of
    multiply-adds with scalar tensors costs several per term: next to a small network, the
    bookkeeping of these scalar ops, not their arithmetic, was most of a rollout's overhead.
    When float32 matrix products may use reduced precision (TF32 or bfloat16, after
    ``torch.set_float32_matmul_precision("high")``), the sum is taken term by term instead.
    """
    x = tensors[0]
    if x.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        out = coefs[0, 0] * x
        for j in range(1, len(tensors)):
            out = torch.addcmul(out, coefs[0, j], tensors[j])
        return out
    return torch.mm(coefs, torch.stack(tensors).view(len(tensors), -1)).view(x.shape)


class Grid:
    """The times of one solve, and every coefficient that depends on them only.

    ``Grid(schedule, t, t_prime=None, dtype=..., device=...)``: ``t`` are the S + 1 step times (all
    update coefficients: alpha, sigma, lambda, step sizes), ``t_prime`` the times given to the
    network (default ``t``). The data prediction of the network output at (x, t'_i) uses t'_i's
    alpha and sigma, x0 = (x - sigma(t'_i) eps) / alpha(t'_i), as the paper's code does
    (``data_prediction_fn(x, t2)``): a learned (t, t') means the same thing in both tools.

    A grid is immutable: its tables (the schedule's values, each solver's coefficients) are computed
    once, when first used, and belong to these times alone, so rollouts that share a grid (a training
    step and the check of its latent move, every batch of gen_data) share them, and no table can be
    used for other times. The tables keep the autograd graph of the mode they were first built in.
    """

    def __init__(self, schedule: NoiseSchedule, t: Tensor, t_prime: Tensor | None = None, *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        if not isinstance(t, Tensor) or t.ndim != 1 or t.numel() < 2:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"t must be a 1-D tensor of S + 1 >= 2 times, got {shape}")
        if t_prime is not None and t_prime.shape != t.shape:
            raise ValueError(f"t_prime has shape {tuple(t_prime.shape)}, t has {tuple(t.shape)}")
        dtype = dtype or (t.dtype if t.is_floating_point() else torch.get_default_dtype())
        self.schedule, self.steps = schedule, t.numel() - 1
        self.dtype, self.device = dtype, torch.device(device) if device is not None else t.device
        self.t_v = t.to(device=self.device, dtype=dtype)
        self.tp_v = None if t_prime is None else t_prime.to(device=self.device, dtype=dtype)
        self._tables: dict = {}
        self._frozen = True

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"a Grid is immutable: build another for other times (setting {name})")
        object.__setattr__(self, name, value)

    def table(self, key, build: Callable[["Grid"], Any]) -> Any:
        """``build(self)``, computed the first time ``key`` is asked for."""
        if key not in self._tables:
            self._tables[key] = build(self)
        return self._tables[key]

    def check(self, schedule: NoiseSchedule, x: Tensor) -> None:
        if schedule is not self.schedule:
            raise ValueError("this Grid was built for another noise schedule")
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"this Grid holds {self.dtype} times on {self.device}; the state is {x.dtype} "
                             f"on {x.device}")

    @cached_property
    def alpha_v(self) -> Tensor:
        return self.schedule.alpha(self.t_v)

    @cached_property
    def sigma_v(self) -> Tensor:
        return self.schedule.sigma(self.t_v)

    @cached_property
    def lam_v(self) -> Tensor:
        return self.schedule.lambda_(self.t_v)

    @cached_property
    def s_v(self) -> Tensor:
        """EDM noise level sigma / alpha."""
        return self.sigma_v / self.alpha_v

    # Per-point scalars as tuples (one unbind each, when first used): indexing a tuple costs no
    # autograd node, where indexing a tensor adds a select (and a zeros + copy in backward) at every use.
    @cached_property
    def t(self) -> tuple[Tensor, ...]:
        return self.t_v.unbind()

    @cached_property
    def tp(self) -> tuple[Tensor, ...]:
        return self.t if self.tp_v is None else self.tp_v.unbind()

    @cached_property
    def alpha(self) -> tuple[Tensor, ...]:
        return self.alpha_v.unbind()

    @cached_property
    def sigma(self) -> tuple[Tensor, ...]:
        return self.sigma_v.unbind()

    @cached_property
    def lam(self) -> tuple[Tensor, ...]:
        return self.lam_v.unbind()

    @cached_property
    def s(self) -> tuple[Tensor, ...]:
        return self.s_v.unbind()

    @cached_property
    def x0_rows(self) -> tuple[Tensor, ...]:
        """Rows (1 / alpha'_i, -sigma'_i / alpha'_i) of the data prediction, primes: at t'_i."""
        if self.tp_v is None:
            a, s = self.alpha_v, self.s_v
        else:
            a = self.schedule.alpha(self.tp_v)
            s = self.schedule.sigma(self.tp_v) / a
        return torch.stack([1.0 / a, -s], 1).unsqueeze(1).unbind()


class Solve:
    """One solve on a grid: the network call at (x, t'_i) and the conversions that need it.

    The one-step update functions (``*_step``) take a ``Solve`` so that a test can start a single
    update from any state and history; the solvers are loops over them. Attributes not defined
    here (``t``, ``alpha``, ``lam``, ``table``, ...) are the grid's.
    """

    def __init__(self, model_fn, grid: Grid, batch: int, cond: Any = None, uc: Any = None):
        self.model_fn, self.grid, self.batch, self.cond, self.uc = model_fn, grid, batch, cond, uc
        self.schedule, self.steps = grid.schedule, grid.steps

    @classmethod
    def start(cls, model_fn, schedule: NoiseSchedule, x: Tensor, t: "Tensor | Grid", t_prime: Tensor | None = None,
              cond: Any = None, uc: Any = None) -> "Solve":
        """From a solver's arguments: ``t`` a tensor of times (with ``t_prime``) or a ``Grid``."""
        if isinstance(t, Grid):
            if t_prime is not None:
                raise ValueError("give t_prime to the Grid, not beside it")
            t.check(schedule, x)
            grid = t
        else:
            grid = Grid(schedule, t, t_prime, dtype=x.dtype, device=x.device)
        return cls(model_fn, grid, x.shape[0], cond, uc)

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def eps(self, x: Tensor, i: int) -> Tensor:
        """Noise prediction at (x, t'_i)."""
        return self.model_fn(x, self.grid.tp[i].expand(self.batch), self.cond, self.uc)

    def x0(self, x: Tensor, eps: Tensor, i: int) -> Tensor:
        """Data prediction (x - sigma'_i eps) / alpha'_i of the network output at (x, t'_i)."""
        return combine(self.grid.x0_rows[i], [x, eps])

    def drift(self, x: Tensor, eps: Tensor, i: int) -> Tensor:
        """Probability-flow ODE at t_i: dx/dt = f(t_i) x + g(t_i) eps."""
        f, g = self.schedule.ode_coefficients(self.grid.t[i])
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
def euler(model_fn, schedule, x, t, t_prime=None, *, order=1, cond=None, uc=None):
    """Euler on the probability-flow ODE in the schedule's time.

    x_{i+1} = x_i + (t_{i+1} - t_i) [f(t_i) x_i + g(t_i) eps(x_i, t'_i)],
    f = d log alpha / dt, g = d sigma / dt - sigma f   (for VE: dx/dsigma = eps).
    NFE = S.
    """
    g_ = Solve.start(model_fn, schedule, x, t, t_prime, cond, uc)
    for i in range(g_.steps):
        x = x + (g_.t[i + 1] - g_.t[i]) * g_.drift(x, g_.eps(x, i), i)
    return x


def heun_step(g: "Solve", x: Tensor, i: int, final: bool = False) -> Tensor:
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


def heun(model_fn, schedule, x, t, t_prime=None, *, order=2, cond=None, uc=None):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step is plain Euler.

    Integrates dy/ds = eps(alpha y, t) in y = x / alpha and the EDM noise level s = sigma / alpha
    (for VE: y = x, s = t = sigma, exactly Karras et al.'s sampler):
      d_i = eps(x_i, t'_i); y~ = y_i + (s_{i+1} - s_i) d_i;
      y_{i+1} = y_i + (s_{i+1} - s_i) (d_i + eps(alpha_{i+1} y~, t'_{i+1})) / 2.
    Not in the schedule's time t: for ``vp_discrete`` (piecewise-linear log alpha in t) the ODE in t
    has kinks at every training step and Heun in t is not second order there. NFE = 2S - 1.
    """
    g_ = Solve.start(model_fn, schedule, x, t, t_prime, cond, uc)
    for i in range(g_.steps):
        x = heun_step(g_, x, i, final=i == g_.steps - 1)
    return x


# --------------------------------------------------------------------------- DPM-Solver++ (multistep)
def dpm_solver_pp_step(g: "Solve", x: Tensor, ms: list[Tensor], i: int, k: int, third_order: str = "exact") -> Tensor:
    """One DPM-Solver++ update of order k from x_i at t_i to t_{i+1}.

    ``ms`` ends with the data predictions ..., m_{i-1}, m_i (at least k of them). No network call.
    ``third_order``: "exact" (D2 with the factor 2, see ``dpm_solver_pp``) or "paper" (without it, as
    the paper's and DPM-Solver's reference code).
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
        d2 = (2.0 if third_order == "exact" else 1.0) * (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 m'' (see docstring)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        x_new = x_new + g.alpha[i + 1] * phi_2 * d1 - g.alpha[i + 1] * phi_3 * d2
    return x_new


def dpm_solver_pp(model_fn, schedule, x, t, t_prime=None, *, order=3, cond=None, uc=None,
                  lower_order_final=True, third_order="exact"):
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
    locally O(h^4) (tests/test_solvers.py::test_local_order). ``third_order="paper"`` takes the
    reference code's D2, for the paper's numbers.)
    NFE = S.
    """
    if not 1 <= order <= 3:
        raise ValueError(f"dpm_solver++ supports orders 1-3, got {order}")
    if third_order not in ("exact", "paper"):
        raise ValueError(f"third_order must be 'exact' or 'paper', got {third_order!r}")
    g_ = Solve.start(model_fn, schedule, x, t, t_prime, cond, uc)
    ms: list[Tensor] = []
    for i, k in enumerate(step_orders(g_.steps, order, lower_order_final)):
        ms.append(g_.x0(x, g_.eps(x, i), i))
        ms = ms[-3:]
        x = dpm_solver_pp_step(g_, x, ms, i, k, third_order)
    return x


# --------------------------------------------------------------------------- UniPC
def _unipc_table(g: Grid, variant: str) -> list[tuple[tuple[Tensor, Tensor], ...]]:
    """Coefficients of the UniPC updates of orders 1, 2, 3 at every step of the grid, computed at once.

    UniPC (Zhao et al. 2023, data prediction, hh = -h, B(h) = hh (bh1) or e^{hh} - 1 (bh2)) solves
    sum_j rho_j x_j^p = b_{p+1} (p = 0..k-1) on the nodes x = (r_1, ..., r_{k-1}, 1), with
    b_p = phi_{p+1}(hh) p! / B(h), phi_{k+1} = phi_k / hh - 1/k!. The systems are at most 3 x 3
    Vandermonde systems, solved in closed form (Lagrange): with two nodes, rho_1 = (b_2 - x_2 b_1) /
    (x_1 - x_2); with three, rho_j = (b_3 - s_j b_2 + p_j b_1) / d_j (s_j, p_j: sum and product of
    the other nodes, d_j = prod_{m != j} (x_j - x_m)). rho^p = 1/2 when k = 2, rho^c = 1/2 when k = 1.

    The update as linear combinations, ``table[k - 1][i] = (pred, corr)``:
      x~  = a x_i + b m_i                 (a = sigma_{i+1}/sigma_i, b = -alpha_{i+1} phi_1)
      x_p = pred . (x_i, m_i, m_{i-1}, ..., m_{i-k+1})            = x~ + sum_j p_j m_{i-j}
      x_c = corr . (x_i, m_i, m_{i+1}, m_{i-1}, ..., m_{i-k+1})   = x~ + sum_j c_j m_{i-j} + c_n m_{i+1}
    Vector ops over all steps, a few dozen whatever S. Rows of steps without enough history
    (i < k - 1) are computed from placeholder points and never used.
    """
    lam = g.lam_v
    h = lam[1:] - lam[:-1]
    hh = -h
    phi = torch.expm1(hh)  # h phi_1
    b_h = hh if variant == "bh1" else phi
    alpha_next = g.alpha_v[1:]
    a = g.sigma_v[1:] / g.sigma_v[:-1]
    b = -alpha_next * phi
    nc = -alpha_next * b_h  # x~ - alpha_{i+1} B(h) (...)
    half = 0.5 * nc
    tables = [(torch.stack([a, b], 1), torch.stack([a, b - half, half], 1))]  # k = 1: rho^c = 1/2
    # order 2
    bs = []
    fact = 1
    for p in range(1, 4):
        phi = phi / hh - 1.0 / fact  # h phi_{p+1}
        bs.append(phi / b_h if fact == 1 else phi * (fact / b_h))
        fact *= p + 1
    # r_1 = (lambda_{i-1} - lambda_i) / h_i = -h_{i-1} / h_i, r_2 = r_1 - h_{i-2} / h_i; before the
    # start h_{-1} = h_{-2} = h_0 stand in (rows never used, but finite, with r_1 != r_2 != 1)
    h1 = torch.cat([h[:1], h[:-1]])
    r1 = -h1 / h
    p1 = half / r1  # rho^p = 1/2
    rho1 = (bs[1] - bs[0]) / (r1 - 1.0)  # nodes (r1, 1)
    q1, qn = nc * rho1 / r1, nc * (bs[0] - rho1)
    tables.append((torch.stack([a, b - p1, p1], 1), torch.stack([a, b - q1 - qn, qn, q1], 1)))
    # order 3
    r2 = r1 - torch.cat([h[:1], h1[:-1]]) / h
    rho1 = (bs[1] - r2 * bs[0]) / (r1 - r2)  # predictor, nodes (r1, r2)
    p1, p2 = nc * rho1 / r1, nc * (bs[0] - rho1) / r2
    d12, d1, d2 = r1 - r2, r1 - 1.0, r2 - 1.0  # corrector, nodes (r1, r2, 1)
    c1 = (bs[2] - (r2 + 1.0) * bs[1] + r2 * bs[0]) / (d12 * d1)
    c2 = (bs[2] - (r1 + 1.0) * bs[1] + r1 * bs[0]) / (-d12 * d2)
    cn = (bs[2] - (r1 + r2) * bs[1] + r1 * r2 * bs[0]) / (d1 * d2)
    q1, q2, qn = nc * c1 / r1, nc * c2 / r2, nc * cn
    tables.append((torch.stack([a, b - p1 - p2, p1, p2], 1),
                   torch.stack([a, b - q1 - q2 - qn, qn, q1, q2], 1)))
    return [tuple(zip(pred.unsqueeze(1).unbind(), corr.unsqueeze(1).unbind())) for pred, corr in tables]


def uni_pc_step(g: "Solve", x: Tensor, ms: list[Tensor], i: int, k: int, variant: str = "bh2",
                corrector: bool = True) -> tuple[Tensor, Tensor | None]:
    """One UniPC update of order k from x_i at t_i to t_{i+1}; ``ms`` ends with ..., m_{i-1}, m_i.

    With ``corrector``: one network call at the predicted x_{i+1}; returns the corrected x_{i+1}
    and m_{i+1} = x0(x_pred, t'_{i+1}) (the next step's history). Without: (x_pred, None), no call.
    Coefficients: ``_unipc_table``.
    """
    if not (0 <= k - 1 <= i < g.steps and 1 <= k <= 3):
        raise ValueError(f"UniPC order {k} (1-3) at step {i} needs {k} past outputs; it has {i + 1}")
    pred, corr = g.table(("uni_pc", variant), lambda gr: _unipc_table(gr, variant))[k - 1][i]
    hist = ms[::-1][:k]  # m_i, m_{i-1}, ...
    x_pred = combine(pred, [x, *hist])
    if not corrector:
        return x_pred, None
    m_next = g.x0(x_pred, g.eps(x_pred, i + 1), i + 1)
    return combine(corr, [x, hist[0], m_next, *hist[1:]]), m_next


def uni_pc(model_fn, schedule, x, t, t_prime=None, *, order=3, cond=None, uc=None, variant="bh2",
           lower_order_final=True):
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
    g_ = Solve.start(model_fn, schedule, x, t, t_prime, cond, uc)
    orders = step_orders(g_.steps, order, lower_order_final)
    ms = [g_.x0(x, g_.eps(x, 0), 0)]
    for i, k in enumerate(orders):
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


def ipndm_step(g: "Solve", y: Tensor, eps_hist: list[Tensor], i: int, k: int) -> Tensor:
    """One AB-k step in y = x / alpha, s = sigma / alpha from s_i to s_{i+1}; ``eps_hist`` newest first.

    y_{i+1} = y_i + (s_{i+1} - s_i) sum_j w^k_j eps_{i-j}. No network call.
    """
    w = IPNDM_WEIGHTS[k]
    d = eps_hist[0] * w[0] if k > 1 else eps_hist[0]
    for wj, e in zip(w[1:], eps_hist[1:]):
        d = torch.add(d, e, alpha=wj)  # one op per term: the weights are plain numbers
    return torch.addcmul(y, g.s[i + 1] - g.s[i], d)


def ipndm(model_fn, schedule, x, t, t_prime=None, *, order=4, cond=None, uc=None, lower_order_final=False):
    """Improved PNDM (Zhang & Chen 2023): Adams-Bashforth on the noise prediction.

    In y = x / alpha and s = sigma / alpha (EDM noise level) the ODE is dy/ds = eps, and
    y_{i+1} = y_i + (s_{i+1} - s_i) sum_j w^k_j eps_{i-j}, with the fixed AB-k weights
    w^1 = 1, w^2 = (3, -1)/2, w^3 = (23, -16, 5)/12, w^4 = (55, -59, 37, -9)/24. NFE = S.
    """
    if not 1 <= order <= 4:
        raise ValueError(f"ipndm supports orders 1-4, got {order}")
    g_ = Solve.start(model_fn, schedule, x, t, t_prime, cond, uc)
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


def dpm_solver_step(g: "Solve", x: Tensor, p: int, k: int) -> Tensor:
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


def dpm_solver(model_fn, schedule, x, t, t_prime=None, *, order=3, cond=None, uc=None):
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
    g_ = Solve.start(model_fn, schedule, x, t, t_prime, cond, uc)
    p = 0
    for k in singlestep_orders(g_.steps, order):
        x = dpm_solver_step(g_, x, p, k)
        p += k
    return x


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SolverOption:
    """One option of a solver: its keyword, the config key that sets it, type, default and allowed values."""

    name: str
    cfg_key: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None

    def check(self, solver: str, value: Any) -> Any:
        if self.type is bool and not isinstance(value, bool):
            raise ValueError(f"{solver} option {self.name} must be true or false, got {value!r}")
        if self.type is not bool and not isinstance(value, self.type):
            raise ValueError(f"{solver} option {self.name} must be a {self.type.__name__}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{solver} option {self.name}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        return value


LOWER_ORDER_FINAL = SolverOption("lower_order_final", "lower_order_final", bool, True,
                                 "lower the order of the final multistep steps (as the paper's code)")
FINAL_DENOISE = SolverOption("final_denoise", "final_denoise", bool, False,
                             "end every solve with the data prediction at the last nonzero time (one more network "
                             "call); a grid ending at t = 0 (k-diffusion sigmas, --gits_ts ...,0) needs it (ours)")


@dataclass(frozen=True)
class SolverInfo:
    """A solver and what it declares: orders, how NFE maps to steps, and its own options."""

    name: str
    fn: Callable
    min_order: int
    max_order: int
    default_order: int
    steps_for_nfe: Callable[[int], int]
    nfe_for_steps: Callable[[int], int]
    options: tuple[SolverOption, ...] = ()
    min_nfe: Callable[[int], int] = lambda order: 1  # the fewest network evaluations at ``order``

    @property
    def all_options(self) -> tuple[SolverOption, ...]:
        """The solver's own options and those every solver has (``final_denoise``)."""
        return self.options + (FINAL_DENOISE,)

    def option(self, name: str) -> SolverOption:
        for o in self.all_options:
            if o.name == name:
                return o
        own = ", ".join(o.name for o in self.all_options)
        raise ValueError(f"{self.name} has no option {name}; its options: {own}")


def _same(n: int) -> int:
    return n


SOLVERS: dict[str, SolverInfo] = {s.name: s for s in (
    SolverInfo("euler", euler, 1, 1, 1, _same, _same),
    SolverInfo("heun", heun, 2, 2, 2, lambda n: (n + 1) // 2, lambda s: 2 * s - 1),
    SolverInfo("dpm_solver++", dpm_solver_pp, 1, 3, 3, _same, _same, (
        LOWER_ORDER_FINAL,
        SolverOption("third_order", "dpmpp_3m", str, "exact", "DPM-Solver++ order-3 step: exact (ours: D2 with "
                     "the Taylor factor 2, third order) or paper (the paper's and DPM-Solver's reference code, "
                     "globally second order)",
                     ("exact", "paper")))),
    SolverInfo("uni_pc", uni_pc, 1, 3, 3, _same, _same, (
        SolverOption("variant", "unipc_variant", str, "bh2", "UniPC variant B(h): bh1 or bh2", ("bh1", "bh2")),
        LOWER_ORDER_FINAL)),
    SolverInfo("ipndm", ipndm, 1, 4, 4, _same, _same, (
        SolverOption("lower_order_final", "lower_order_final", bool, False,
                     "lower the order of the last steps (off in the paper's iPNDM)"),)),
    SolverInfo("dpm_solver", dpm_solver, 1, 3, 3, _same, _same, min_nfe=lambda order: 3 if order == 3 else 1),
)}


def register_solver(info: SolverInfo) -> SolverInfo:
    """Add (or replace) a solver: ``--solver_name info.name`` then runs it, with its declared options
    as command-line options (see README, Architecture)."""
    SOLVERS[info.name] = info
    return info


def get_solver(name: str) -> SolverInfo:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver_name {name!r}; choose from {', '.join(SOLVERS)}")
    return SOLVERS[name]


def steps_for_nfe(name: str, nfe: int) -> int:
    """Number of intervals S of the discretization for an NFE budget (heun: NFE = 2S - 1 <= budget)."""
    if nfe < 1:
        raise ValueError(f"NFE must be >= 1, got {nfe}")
    return get_solver(name).steps_for_nfe(nfe)


def solve(name: str, model_fn, schedule: NoiseSchedule, x: Tensor, t: "Tensor | Grid", t_prime: Tensor | None = None,
          *, order: int | None = None, cond: Any = None, uc: Any = None, **options) -> Tensor:
    """Run solver ``name`` from x = x_T along ``t`` (network at ``t_prime``).

    ``t``: the times (a tensor, with ``t_prime``), or a ``Grid`` shared by rollouts on the same times.
    ``options``: the solver's declared options (``SolverInfo.options``), checked; an option the
    solver does not have is an error, not silently ignored.
    """
    info = get_solver(name)
    order = info.default_order if order is None else int(order)
    if not info.min_order <= order <= info.max_order:
        raise ValueError(f"{name} supports orders {info.min_order}-{info.max_order}, got {order}")
    checked = {k: info.option(k).check(name, v) for k, v in options.items()}
    final = bool(checked.pop("final_denoise", False))

    def run(tt, tp):
        return info.fn(model_fn, schedule, x, tt, tp, order=order, cond=cond, uc=uc, **checked)

    return with_final_denoise(run, model_fn, schedule, t, t_prime, final, cond, uc)


def check_grid(t: Tensor, t_prime: Tensor | None = None) -> bool:
    """Raise ValueError unless ``t`` is finite and strictly decreasing, positive except maybe a final 0, and
    ``t_prime`` finite and positive where t is; returns whether the grid ends at t = 0."""
    with torch.no_grad():
        tv = t.detach()
        if not bool(torch.isfinite(tv).all()):
            raise ValueError(f"the times must be finite, got {tv.tolist()}")
        if not bool((tv[1:] < tv[:-1]).all()):
            raise ValueError(f"the times must decrease strictly, got {tv.tolist()}")
        ends_at_zero = bool(tv[-1] == 0)
        if bool((tv[:-1] <= 0).any()) or bool(tv[-1] < 0):
            raise ValueError(f"the times must be > 0 (a final 0 only with final_denoise), got {tv.tolist()}")
        if t_prime is not None:
            pv = t_prime.detach()[:-1] if ends_at_zero else t_prime.detach()
            if not bool(torch.isfinite(pv).all()) or bool((pv <= 0).any()):
                raise ValueError(f"the network times t' must be finite and > 0, got {t_prime.detach().tolist()}")
    return ends_at_zero


def with_final_denoise(run: Callable, model_fn, schedule: NoiseSchedule, t: "Tensor | Grid",
                       t_prime: Tensor | None, final: bool, cond: Any = None, uc: Any = None) -> Tensor:
    """``run(t, t')`` on a checked grid; with ``final`` (or a grid ending at t = 0, which needs it) the result
    is the data prediction x0 = (x - sigma eps) / alpha at the last nonzero time, k-diffusion's convention
    for sigmas that end at 0 (the last step to 0 is that prediction): one more network call."""
    if isinstance(t, Grid):
        grid = t
        zero = grid.table("checked", lambda g: check_grid(g.t_v, g.tp_v))
    else:
        grid, zero = None, check_grid(t, t_prime)
    if zero and not final:
        raise ValueError("the grid ends at t = 0, where the noise prediction is undefined: pass "
                         "final_denoise=True (--final_denoise): the solve stops at the last nonzero time and "
                         "returns the data prediction there")
    if not final:
        return run(t, t_prime)
    if grid is not None:
        tt, tp = grid.t_v, grid.tp_v
    else:
        tt, tp = t, t_prime
    if zero:
        tt, tp = tt[:-1], None if tp is None else tp[:-1]
        if tt.numel() < 2:
            raise ValueError("a grid ending at t = 0 needs at least two nonzero times")
        if grid is not None:
            sub = Grid(grid.schedule, tt, tp, dtype=grid.dtype, device=grid.device)
            x = run(sub, None)
        else:
            x = run(tt, tp)
    else:
        x = run(t, t_prime)
    tl = (tp if tp is not None else tt)[-1]
    eps = model_fn(x, tl.expand(x.shape[0]), cond, uc)
    alpha, sigma = schedule.alpha(tl), schedule.sigma(tl)
    return (x - sigma * eps.to(x.dtype)) / alpha


def nfe_of(name: str, steps: int) -> int:
    return get_solver(name).nfe_for_steps(steps)


__all__ = ["solve", "register_solver", "check_grid", "with_final_denoise", "get_solver", "steps_for_nfe", "nfe_of", "SOLVERS", "SolverInfo", "SolverOption",
           "step_orders", "singlestep_orders", "euler", "heun", "dpm_solver_pp", "uni_pc", "ipndm", "dpm_solver",
           "Grid", "Solve", "heun_step", "dpm_solver_pp_step", "uni_pc_step", "ipndm_step", "dpm_solver_step"]
