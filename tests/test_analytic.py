"""The analytic models: Gaussian (closed-form ODE solution) and the digits Gaussian mixture."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ld3.models.analytic import GMMNoise, digits_gmm_model, gaussian_model, load_digits_array, make_schedule
from ld3.samplers.schedules import VPDiscreteSchedule, VPLinearSchedule

F64 = dict(dtype=torch.float64)
ROOT = Path(__file__).resolve().parents[1]
SCHEDULE_NAMES = ["ve", "vp_discrete"]


def _t(v) -> torch.Tensor:
    return torch.as_tensor(v, **F64)


def _brute_force_gmm(x: np.ndarray, alpha: float, sigma: float, weights, means, variances):
    """Posterior weights and denoiser of a diagonal GMM for one flat x, component by component."""
    log_post = []
    for w, mu, v in zip(weights, means, variances):
        var = alpha**2 * v + sigma**2
        log_likelihood = sum(-0.5 * (xd - alpha * md) ** 2 / vd - 0.5 * math.log(2 * math.pi * vd)
                             for xd, md, vd in zip(x, mu, var))
        log_post.append(math.log(w) + log_likelihood)
    log_post = np.array(log_post)
    p = np.exp(log_post - log_post.max())
    p /= p.sum()
    denoised = np.zeros_like(x)
    for pk, mu, v in zip(p, means, variances):
        denoised += pk * (mu + alpha * v * (x - alpha * mu) / (alpha**2 * v + sigma**2))
    return p, denoised


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
def test_gmm_denoiser_equals_brute_force(schedule_name):
    model = digits_gmm_model(schedule_name)
    net, sch = model.net, model.schedule
    weights, means, variances = net.log_w.exp().numpy(), net.means.numpy(), net.variances.numpy()
    gen = torch.Generator().manual_seed(0)
    data, _ = load_digits_array()
    for t_value in (sch.t_min * 3, 0.3 * sch.T if schedule_name == "vp_discrete" else 0.7, sch.T):
        t = _t(t_value)
        a, s = float(sch.alpha(t)), float(sch.sigma(t))
        # a noisy digit at time t
        x = a * torch.from_numpy(data[5:6]) + s * torch.randn(1, 1, 8, 8, generator=gen, **F64)
        p, denoised = _brute_force_gmm(x.reshape(-1).numpy(), a, s, weights, means, variances)
        assert abs(p.sum() - 1) < 1e-12
        assert np.allclose(net.denoise(x, t).reshape(-1).numpy(), denoised, rtol=1e-10, atol=1e-12)
        eps = (x.reshape(-1).numpy() - a * denoised) / s
        assert np.allclose(net(x, t).reshape(-1).numpy(), eps, rtol=1e-9, atol=1e-10)
        assert torch.allclose(model.noise_fn(x, t, None, None), net(x, t))


def test_gmm_per_sample_times_equal_single_calls():
    model = digits_gmm_model("vp_discrete")
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1), **F64)
    t = torch.tensor([0.002, 0.1, 0.35, 0.7, 1.0], **F64)
    batch = model.noise_fn(x, t, None, None)
    singles = torch.cat([model.noise_fn(x[i:i + 1], t[i], None, None) for i in range(5)])
    assert torch.allclose(batch, singles, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES + ["flow"])
def test_gmm_shared_time_products_equal_the_per_sample_form(schedule_name):
    """One time for the batch goes through matrix products (no B x K x D tensor); the values and the gradient
    in x equal the per-sample form's, from the smallest time to the largest."""
    net = digits_gmm_model(schedule_name).net
    sch = net.schedule
    for t_value in (sch.t_min, sch.t_min * 3, 0.5 * (sch.t_min + sch.T), sch.T):
        t = torch.full((7,), t_value, **F64)
        scale = float(sch.alpha(t[0])) + float(sch.sigma(t[0]))
        x = (scale * torch.randn(7, 64, generator=torch.Generator().manual_seed(3), **F64)).requires_grad_(True)
        shared, each = net._denoise_shared(x, t[0]), net._denoise_each(x, t)
        assert torch.allclose(shared, each, rtol=1e-10, atol=1e-10 * scale)
        g_shared, = torch.autograd.grad((shared * torch.arange(64.0, **F64)).sum(), x)
        g_each, = torch.autograd.grad((each * torch.arange(64.0, **F64)).sum(), x)
        assert torch.allclose(g_shared, g_each, rtol=1e-8, atol=1e-8)
        assert torch.equal(net.denoise(x, t), shared)  # equal times take the products


def test_gmm_time_gradient_with_one_time_and_with_a_time_per_sample():
    """An expanded time (as the solvers pass it) takes the matrix products and its gradient is the sum over the
    batch; separate equal times with a gradient take the per-sample form, each with its own gradient."""
    from ld3.models.analytic import _one_time

    net = digits_gmm_model("ve").net
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5), **F64)
    w = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(6), **F64)
    t0 = torch.tensor(1.3, **F64, requires_grad=True)
    each = torch.full((4,), 1.3, **F64, requires_grad=True)
    assert _one_time(t0.expand(4)) and not _one_time(each) and _one_time(each.detach())
    g_one, = torch.autograd.grad((net(x, t0.expand(4)) * w).sum(), t0)
    g_each, = torch.autograd.grad((net(x, each) * w).sum(), each)
    assert torch.allclose(g_one, g_each.sum(), rtol=1e-10)
    singles = [torch.autograd.grad((net(x[i:i + 1], t) * w[i:i + 1]).sum(), t)[0]
               for i in range(4) for t in [torch.tensor(1.3, **F64, requires_grad=True)]]
    assert torch.allclose(g_each, torch.stack(singles), rtol=1e-10)
    h = 1e-6  # and the one-time gradient against a central difference
    fd = ((net(x, torch.tensor(1.3 + h, **F64)) - net(x, torch.tensor(1.3 - h, **F64))) * w).sum() / (2 * h)
    assert torch.allclose(g_one, fd, rtol=1e-6)


def test_gmm_expanded_time_is_read_in_the_input_dtype():
    """A float64 time expanded over a float32 batch (as the solvers pass it) is rounded to float32 before the
    denoiser, exactly as a float32 time vector is: the fast path changes no value."""
    net = digits_gmm_model("ve").net
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    t64 = torch.tensor(0.123456789012345, **F64)
    assert torch.equal(net(x, t64.expand(3)), net(x, t64.float().expand(3).clone()))


def test_gmm_float32_input_gives_float32_output():
    model = digits_gmm_model("ve")
    x = torch.randn(2, 1, 8, 8)
    out = model.noise_fn(x, torch.tensor(1.0), None, None)
    ref = model.noise_fn(x.double(), torch.tensor(1.0, **F64), None, None)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
def test_one_component_gmm_is_the_gaussian(schedule_name):
    g = gaussian_model(schedule_name, shape=(1, 4, 4), seed=3)
    net = g.net
    gmm = GMMNoise(g.schedule, torch.ones(1, **F64), net.mu.reshape(1, -1), net.std.reshape(1, -1) ** 2,
                   (1, 4, 4))
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2), **F64)
    for t in (g.schedule.t_min, 0.5 if schedule_name == "vp_discrete" else 1.0, g.schedule.T):
        assert torch.allclose(gmm(x, _t(t)), net(x, _t(t)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
def test_gaussian_noise_prediction_formula(schedule_name):
    """eps(x, t) = sigma (x - alpha mu) / (alpha^2 std^2 + sigma^2), i.e. E[eps | x_t] for Gaussian data."""
    g = gaussian_model(schedule_name, seed=4)
    net, sch = g.net, g.schedule
    t = _t(0.4 if schedule_name == "vp_discrete" else 2.0)
    a, s = sch.alpha(t), sch.sigma(t)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), **F64)
    expected = s * (x - a * net.mu) / (a**2 * net.std**2 + s**2)
    assert torch.allclose(net(x, t), expected, rtol=1e-14, atol=1e-14)
    assert g.latent_shape == (1, 8, 8)
    assert g.time_mode == ("lambda" if schedule_name == "ve" else "time")


@pytest.mark.parametrize("schedule", [make_schedule("ve"), make_schedule("vp_discrete"), VPLinearSchedule()],
                         ids=["ve", "vp_discrete", "vp_linear"])
def test_gaussian_exact_solution_solves_the_ode(schedule):
    """d/dt of the closed form equals the probability-flow drift f(t) x + g(t) eps(x, t)."""
    g = gaussian_model(schedule, seed=5)
    net = g.net
    x_T = schedule.prior(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), **F64))
    if isinstance(schedule, VPDiscreteSchedule):
        times, d = [(n + 0.5) / 1000 for n in (3, 50, 400, 900)], 1e-7  # inside linear pieces
    else:
        times, d = [schedule.t_min * 5, 0.3 * schedule.T, 0.9 * schedule.T], None
    for tv in times:
        t = _t(tv)
        step = d if d is not None else 1e-6 * tv
        x = net.exact_solution(x_T, schedule.T, t)
        up = net.exact_solution(x_T, schedule.T, t + step)
        down = net.exact_solution(x_T, schedule.T, t - step)
        dx = (up - down) / (2 * step)
        f, gg = schedule.ode_coefficients(t)
        drift = f * x + gg * net(x, t)
        assert torch.allclose(dx, drift, rtol=1e-6, atol=1e-7 * float(drift.abs().max())), tv


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
def test_gaussian_exact_solution_composes(schedule_name):
    g = gaussian_model(schedule_name, seed=6)
    net, sch = g.net, g.schedule
    x_T = sch.prior(torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2), **F64))
    t1, t2 = (0.6, 0.05) if schedule_name == "vp_discrete" else (10.0, 0.1)
    direct = net.exact_solution(x_T, sch.T, t2)
    via = net.exact_solution(net.exact_solution(x_T, sch.T, t1), t1, t2)
    assert torch.allclose(direct, via, rtol=1e-12, atol=1e-12)
    assert torch.allclose(net.exact_solution(x_T, sch.T, sch.T), x_T, rtol=1e-14, atol=1e-14)
    # the whitened state is constant along the ODE
    a, s = sch.alpha(_t(t2)), sch.sigma(_t(t2))
    aT, sT = sch.alpha(_t(sch.T)), sch.sigma(_t(sch.T))
    z_end = (direct - a * net.mu) / torch.sqrt(a**2 * net.std**2 + s**2)
    z_start = (x_T - aT * net.mu) / torch.sqrt(aT**2 * net.std**2 + sT**2)
    assert torch.allclose(z_end, z_start, rtol=1e-12, atol=1e-12)


def test_gaussian_model_is_deterministic_by_seed():
    a, b, c = gaussian_model("ve", seed=1), gaussian_model("ve", seed=1), gaussian_model("ve", seed=2)
    assert torch.equal(a.net.mu, b.net.mu) and torch.equal(a.net.std, b.net.std)
    assert not torch.equal(a.net.mu, c.net.mu)
    assert (a.net.std > 0).all()


def test_gmm_sample_data_statistics():
    model = digits_gmm_model("ve")
    net = model.net
    samples = net.sample_data(20000, torch.Generator().manual_seed(0)).reshape(20000, -1)
    w = net.log_w.exp()
    mean = (w[:, None] * net.means).sum(0)
    var = (w[:, None] * (net.variances + net.means**2)).sum(0) - mean**2
    assert torch.allclose(w.sum(), torch.ones((), **F64))
    se = torch.sqrt(var / 20000)
    assert ((samples.mean(0) - mean).abs() < 5 * se).all()


def test_digits_gmm_is_cached_and_fitted():
    a, b = digits_gmm_model("ve"), digits_gmm_model("vp_discrete")
    assert a.latent_shape == (1, 8, 8) and b.latent_shape == (1, 8, 8)
    assert torch.equal(a.net.means, b.net.means)  # the same fit
    assert a.net.means.shape == (40, 64) and (a.net.variances >= 1e-3 - 1e-12).all()
    data, labels = load_digits_array()
    assert data.shape == (1797, 1, 8, 8) and data.min() >= -1 and data.max() <= 1
    assert set(labels) == set(range(10))
    # the mixture mean is the data mean (EM keeps it)
    mean = (a.net.log_w.exp()[:, None] * a.net.means).sum(0).numpy()
    assert np.allclose(mean, data.reshape(len(data), -1).mean(0), atol=1e-6)


def _load_grid_script():
    spec = importlib.util.spec_from_file_location("make_gmm_grid", ROOT / "scripts" / "make_gmm_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_gmm_samples_look_like_digits(tmp_path):
    """64 samples drawn by uni_pc (20 steps) from noise: a classifier fitted on the digits is as sure
    of them as of real digits, they are about as close to real digits as real digits are to each
    other, they cover the classes, and the PNG grid (scripts/make_gmm_grid.py) is written."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import NearestNeighbors

    script = _load_grid_script()
    samples = script.sample_digits(64, "uni_pc", 20)
    assert samples.shape == (64, 1, 8, 8) and torch.isfinite(samples).all()
    flat = samples.reshape(64, -1).numpy()
    data, labels = load_digits_array()
    data = data.reshape(len(data), -1)
    noise = np.random.default_rng(0).normal(data.mean(0), data.std(0), size=(64, 64))

    clf = LogisticRegression(max_iter=3000).fit(data, labels)
    conf_samples = clf.predict_proba(flat).max(1).mean()
    conf_noise = clf.predict_proba(noise).max(1).mean()
    assert conf_samples > 0.85 and conf_noise < 0.75, (conf_samples, conf_noise)
    assert len(set(clf.predict(flat))) >= 8

    nn = NearestNeighbors(n_neighbors=2).fit(data)
    d_data = np.median(nn.kneighbors(data)[0][:, 1])
    d_samples = np.median(nn.kneighbors(flat)[0][:, 0])
    d_noise = np.median(nn.kneighbors(noise)[0][:, 0])
    assert d_samples < 1.6 * d_data < d_noise, (d_samples, d_data, d_noise)

    out = tmp_path / "grid.png"
    script.save_grid(samples, out)
    from PIL import Image

    with Image.open(out) as img:
        assert img.size == (8 * (8 * 8 + 2) + 2,) * 2 and img.mode == "L"
