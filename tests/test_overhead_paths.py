"""The pieces that keep main.py's wall time close to the network's (issue: speed and memory):
network timing with gradient hooks, solver coefficients shared between rollouts, the trainer's
cheaper small ops, figures drawn by helpers, PNGs converted per batch. Each is checked against
the plain computation it replaces."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from ld3.data import save_pngs, to_uint8
from ld3.figures import FigureHelper
from ld3.timing import Timed
from ld3.trainer import clip_grad_norm_, project
from ld3.models.analytic import digits_gmm_model
from ld3.samplers.discretizations import get_discretization
from ld3.samplers.solvers import Grid, combine, solve

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- timing
class _Slow(torch.autograd.Function):
    """Identity that sleeps ``fwd`` seconds in forward and ``bwd`` in backward."""

    @staticmethod
    def forward(ctx, x, fwd, bwd):
        time.sleep(fwd)
        ctx.bwd = bwd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bwd)
        return g, None, None


def _net(x, *_):
    return _Slow.apply(x * 2.0, 0.02, 0.03)


def test_timed_counts_forward_and_backward_of_the_call_only():
    """Three calls, each 20 ms forward and 30 ms backward, between solver-like ops that sleep 50 ms
    each way: the clock holds about 60 ms forward and 90 ms backward, none of the 150 ms outside
    (the bounds leave 90 ms for a slow machine, and would fail if the outside time were counted)."""
    timed = Timed(_net)
    x = torch.ones(3, requires_grad=True)
    y = x
    for _ in range(3):
        y = _Slow.apply(timed(y) + 1.0, 0.05, 0.05)
    y.sum().backward()
    c = timed.clock
    assert c.calls == 3
    assert 0.06 <= c.forward_s < 0.15, c.forward_s
    assert 0.09 <= c.backward_s < 0.18, c.backward_s
    assert torch.equal(x.grad, torch.full((3,), 8.0))  # the hooks leave gradients alone


def test_timed_disabled_or_without_grad_only_counts():
    timed = Timed(lambda x: x * 3.0, enabled=False)
    timed(torch.ones(2))
    assert timed.clock.calls == 1 and timed.clock.total_s == 0.0
    on = Timed(lambda x: x * 3.0)
    with torch.no_grad():
        out = on(torch.ones(2, requires_grad=True))
    assert on.clock.calls == 1 and on.clock.backward_s == 0.0 and not out.requires_grad


# --------------------------------------------------------------------------- solver coefficients
def test_combine_is_the_linear_combination():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    w = torch.randn(1, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(combine(w, xs), sum(w[0, j] * xs[j] for j in range(4)), rtol=0, atol=1e-14)


def test_combine_keeps_float32_precision_when_matmuls_may_not():
    """With TF32 / bfloat16 products allowed, combine sums term by term (full float32)."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 3, 4, 4, generator=g) for _ in range(3)]
    w = torch.randn(1, 3, generator=g)
    exact = sum(w[0, j].double() * xs[j].double() for j in range(3))
    old = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(precision)
            assert (combine(w, xs).double() - exact).abs().max() < 1e-5, precision
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("name", ["uni_pc", "ipndm", "dpm_solver++", "heun", "euler", "dpm_solver"])
def test_a_shared_grid_gives_the_same_rollouts(name):
    """A training step's two rollouts share a ``Grid``: the second (no gradient) gives exactly what a
    rollout computing its own coefficients gives, and the first's gradient is unchanged."""
    model = digits_gmm_model()
    sch = model.schedule
    x = sch.prior(torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(1)))
    t0 = get_discretization("edm", sch, 6 if name != "heun" else 3)
    grads = []
    for share in (False, True):
        t = t0.clone().requires_grad_(True)
        tp = (t0 * 1.01).clamp(max=sch.T).requires_grad_(True)
        grid = Grid(sch, t, tp, dtype=x.dtype) if share else None
        out = solve(name, model.noise_fn, sch, x, grid if share else t, None if share else tp)
        grads.append(torch.autograd.grad(out.pow(2).sum(), [t, tp]))
        with torch.no_grad():
            again = solve(name, model.noise_fn, sch, x * 0.5, grid) if share else None
            fresh = solve(name, model.noise_fn, sch, x * 0.5, t.detach(), tp.detach())
        if share:
            assert torch.equal(again, fresh)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_a_grid_is_tied_to_its_schedule_dtype_and_times():
    """A grid cannot be used for another schedule or dtype, nor beside other times: its tables
    belong to the times it was built from."""
    model = digits_gmm_model()
    sch = model.schedule
    x = torch.zeros(1, *model.latent_shape, dtype=torch.float64)
    t = get_discretization("edm", sch, 4)
    grid = Grid(sch, t, dtype=torch.float64)
    solve("euler", model.noise_fn, sch, x, grid)
    with pytest.raises(ValueError, match="float64"):
        solve("euler", model.noise_fn, sch, x.float(), grid)
    with pytest.raises(ValueError, match="another noise schedule"):
        solve("euler", model.noise_fn, type(sch)(), x, grid)
    with pytest.raises(ValueError, match="t_prime"):
        solve("euler", model.noise_fn, sch, x, grid, t)
    with pytest.raises(AttributeError):
        grid.t_v = t * 2  # noqa: B010 - read-only


# --------------------------------------------------------------------------- trainer pieces
def test_clip_grad_norm_matches_torch():
    for scale in (1e-3, 1.0, 50.0):
        a = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
        b = torch.nn.Parameter(a.detach().clone())
        a.grad = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * scale
        b.grad = a.grad.clone()
        torch.nn.utils.clip_grad_norm_([a], 1.0)
        clip_grad_norm_(b, 1.0)
        assert torch.equal(a.grad, b.grad)


def test_project_onto_the_ball():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    d = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    d[:2] *= 0.01 / d[:2].flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)  # rows 0-1 inside r = 0.05
    d[2:] *= 0.2 / d[2:].flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)  # rows 2-3 outside
    p = project(z + d, z, 0.05)
    assert torch.allclose(p[:2], (z + d)[:2], rtol=0, atol=1e-15)
    moved = (p - z)[2:].flatten(1)
    assert torch.allclose(moved.norm(dim=1), torch.full((2,), 0.05, dtype=torch.float64), rtol=1e-6)
    cos = (moved * d[2:].flatten(1)).sum(1) / (moved.norm(dim=1) * d[2:].flatten(1).norm(dim=1))
    assert torch.allclose(cos, torch.ones(2, dtype=torch.float64))


# --------------------------------------------------------------------------- figures and files
def test_figure_helpers_draw_and_report_errors(tmp_path):
    history = [{"step": 0, "phase": 0, "valid_loss": 0.5, "best_valid": 0.5},
               {"step": 1, "phase": 1, "train_loss": 0.4, "valid_loss": 0.3, "best_valid": 0.3},
               {"step": 2, "phase": 2, "train_loss": 0.2, "valid_loss": 0.25, "best_valid": 0.25}]
    with FigureHelper(CPU) as fig:
        fig.draw("plot_curves", history, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as im:
        assert im.size[0] > 100
    with pytest.raises(TypeError):
        with FigureHelper(CPU) as fig:
            fig.draw("plot_curves", None, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_pngs_hold_the_images(tmp_path):
    img = torch.rand(3, 1, 5, 6, generator=torch.Generator().manual_seed(4)) * 2 - 1
    save_pngs(tmp_path, [7, 8, 9], img)
    for j, i in enumerate((7, 8, 9)):
        with Image.open(tmp_path / f"{i:06d}.png") as im:
            assert np.array_equal(np.asarray(im), to_uint8(img)[j][..., 0])


@pytest.mark.parametrize("kind", ["rmsprop", "rmsprop_wd_nomom", "sgd", "adam"])
def test_own_optimizers_equal_torch_optim_bit_for_bit(kind):
    """ld3.optim's RMSprop / SGD / Adam = torch.optim's single-tensor updates, bit for bit over many steps,
    and their state dicts load into each other (resume files of either kind)."""
    from ld3.optim import SGD, Adam, RMSprop

    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64 if kind == "adam" else torch.float32))
    b = torch.nn.Parameter(a.detach().clone())
    if kind == "sgd":
        ours, ref = SGD(a, lr=0.03), torch.optim.SGD([b], lr=0.03)
    elif kind == "adam":  # float64: the full-batch trainer's parameters
        ours, ref = Adam(a, lr=0.1), torch.optim.Adam([b], lr=0.1, foreach=False)
    else:
        kw = dict(momentum=0.9, weight_decay=0.0) if kind == "rmsprop" else dict(momentum=0.0, weight_decay=0.01)
        ours, ref = RMSprop(a, lr=0.005, **kw), torch.optim.RMSprop([b], lr=0.005, **kw)
    for k in range(40):
        grad = torch.randn(7, generator=g, dtype=a.dtype) * (10 ** (k % 5 - 2))
        a.grad, b.grad = grad.clone(), grad.clone()
        if k == 20:  # a learning-rate change, as the trainer's decay makes
            ours.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.002
        ours.step()
        ref.step()
        assert torch.equal(a, b), k
    # state dicts interchange: continue each from the other's state
    c = torch.nn.Parameter(a.detach().clone())
    d = torch.nn.Parameter(b.detach().clone())
    if kind == "sgd":
        ours2, ref2 = SGD(c, lr=1.0), torch.optim.SGD([d], lr=1.0)
    elif kind == "adam":
        ours2, ref2 = Adam(c, lr=1.0), torch.optim.Adam([d], lr=1.0, foreach=False)
    else:
        ours2, ref2 = RMSprop(c, lr=1.0, **kw), torch.optim.RMSprop([d], lr=1.0, **kw)
    ours2.load_state_dict(ref.state_dict())
    ref2.load_state_dict(ours.state_dict())
    for _ in range(5):
        grad = torch.randn(7, generator=g, dtype=c.dtype)
        c.grad, d.grad = grad.clone(), grad.clone()
        ours2.step()
        ref2.step()
        assert torch.equal(c, d)


def test_training_does_not_import_dynamo(tmp_path):
    """A main.py run never imports torch._dynamo (nor sympy): torch.optim would, ~150 MB."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from ld3.optim import Adam, RMSprop, SGD\n"
            "p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.ones(3)\n"
            "o = RMSprop(p, lr=0.1, momentum=0.9); o.step(); s = SGD(p, lr=0.1); s.step()\n"
            "a = Adam(p, lr=0.1); a.step()\n"
            "import ld3.trainer, ld3.full_batch, ld3.cli.main\n"
            "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
