"""The shipped 8x8 digits diffusion model, the digit classifier and the Frechet metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from ld3.metrics import digit_quality, feature_stats, frechet_distance, frechet_from_stats
from ld3.models.digit_classifier import DEFAULT_CLASSIFIER_WEIGHTS, load_digit_classifier, load_digits_split
from ld3.models.digits_unet import (DEFAULT_WEIGHTS, DIGITS_IMG_SHAPE, DigitsDenoiser, count_parameters,
                                load_digits_denoiser, sha256_of)

REFERENCE = Path(__file__).resolve().parent / "data" / "digits_denoiser_reference.safetensors"


@pytest.fixture(scope="module")
def denoiser() -> DigitsDenoiser:
    return load_digits_denoiser()


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def _card(weights: Path) -> dict:
    return json.loads(weights.with_suffix(".json").read_text())


def test_shipped_denoiser_loads_in_eval_mode(denoiser):
    card = _card(DEFAULT_WEIGHTS)
    assert not denoiser.training
    assert count_parameters(denoiser) == card["params"]
    assert 100_000 <= card["params"] <= 300_000
    assert DEFAULT_WEIGHTS.stat().st_size <= 5 * 2**20
    assert tuple(card["img_shape"]) == DIGITS_IMG_SHAPE == (1, 8, 8)
    out = denoiser(torch.zeros(3, *DIGITS_IMG_SHAPE), torch.tensor([0.1, 1.0, 10.0]))
    assert out.shape == (3, *DIGITS_IMG_SHAPE)


@pytest.mark.parametrize("weights", [DEFAULT_WEIGHTS, DEFAULT_CLASSIFIER_WEIGHTS], ids=["denoiser", "classifier"])
def test_sha256_matches_card(weights):
    assert sha256_of(weights) == _card(weights)["sha256"]


def test_output_matches_stored_reference(denoiser):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(REFERENCE), "pt") as f:
        meta = f.metadata()
    assert meta["weights_sha256"] == _card(DEFAULT_WEIGHTS)["sha256"], "reference made for other weights"
    ref = load_file(str(REFERENCE))
    for s, expected in zip(ref["sigmas"], ref["d"]):
        got = denoiser(ref["x"] * max(float(s), 1.0), s)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_preconditioning_matches_edm_formulas(denoiser):
    gen = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.002, 0.03, 0.5, 3.0, 80.0])
    x = torch.randn(5, *DIGITS_IMG_SHAPE, generator=gen) * sigma.clamp(min=1).reshape(-1, 1, 1, 1)
    sd = 0.5
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / torch.sqrt(s**2 + sd**2)
    c_in = 1 / torch.sqrt(s**2 + sd**2)
    c_noise = torch.log(sigma) / 4
    expected = c_skip * x + c_out * denoiser.model(c_in * x, c_noise)
    torch.testing.assert_close(denoiser(x, sigma), expected, rtol=1e-5, atol=1e-6)
    # A scalar sigma is broadcast to the batch; class labels are ignored (unconditional).
    torch.testing.assert_close(denoiser(x[:2], 0.5), denoiser(x[:2], torch.tensor([0.5, 0.5]), None))


def test_float64_input_and_batch_independence(denoiser):
    x = torch.randn(4, *DIGITS_IMG_SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.4, 1.5, 6.0], dtype=torch.float64)
    batched = denoiser(x, sigma)
    assert batched.dtype == torch.float64
    single = torch.cat([denoiser(x[i:i + 1], sigma[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_denoiser_removes_noise_from_heldout_digits(denoiser, split):
    _, _, x_va, _ = split
    gen = torch.Generator().manual_seed(3)
    # Shipped weights remove 67/83/89 percent of the noise variance at these levels; the
    # untrained network (D = c_skip x) removes about 15 percent at sigma 0.5.
    for sigma, bound in ((0.2, 0.5), (0.5, 0.3), (1.0, 0.2)):
        noisy = x_va + sigma * torch.randn(x_va.shape, generator=gen)
        err_in = (noisy - x_va).pow(2).mean()
        err_out = (denoiser(noisy, sigma) - x_va).pow(2).mean()
        assert err_out < bound * err_in, (sigma, float(err_out), float(err_in))


def test_edm_wrapper_gives_noise_prediction(denoiser):
    from ld3.models.base import edm_model

    model = edm_model("digits", denoiser, DIGITS_IMG_SHAPE)
    x = torch.randn(2, *DIGITS_IMG_SHAPE, generator=torch.Generator().manual_seed(4))
    t = torch.tensor(2.0)
    eps = model.noise_fn(x, t, None, None)
    torch.testing.assert_close(eps, (x - denoiser(x, t)) / 2.0)


def test_classifier_heldout_accuracy(classifier, split):
    _, _, x_va, y_va = split
    feats, probs, pred = classifier.predict(x_va)
    assert feats.shape == (len(x_va), 64)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(x_va)))
    assert (pred == y_va).float().mean() >= 0.95
    assert (pred == y_va).float().mean() >= _card(DEFAULT_CLASSIFIER_WEIGHTS)["heldout_accuracy"] - 1e-6


def test_split_is_fixed_and_disjoint(split):
    x_tr, y_tr, x_va, y_va = split
    assert (len(x_tr), len(x_va)) == (1437, 360)
    assert x_tr.min() >= -1 and x_tr.max() <= 1
    assert torch.bincount(y_va).min() >= 35
    a, b = load_digits_split()[2], x_va
    assert torch.equal(a, b)


def test_frechet_distance_matches_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) + 0.5
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = np.sum((mu_a - mu_b) ** 2) + np.trace(ca + cb - 2 * np.real(scipy.linalg.sqrtm(ca @ cb)))
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-9)
    assert frechet_distance(torch.as_tensor(a), torch.as_tensor(b)) == pytest.approx(direct, rel=1e-9)
    assert frechet_from_stats(*feature_stats(a), *feature_stats(b)) == pytest.approx(direct, rel=1e-9)


def test_frechet_of_a_set_with_itself_is_zero():
    a = np.random.default_rng(1).normal(size=(500, 16))
    assert abs(frechet_distance(a, a)) < 1e-6


def test_frechet_from_stats_closed_form_for_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_from_stats(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_digit_quality_of_real_heldout_digits(classifier, split):
    _, _, x_va, _ = split
    q = digit_quality(x_va, classifier)
    assert q["confident_share"] > 0.95
    assert sum(q["class_histogram"]) == pytest.approx(1.0, abs=1e-3)
    assert min(q["class_histogram"]) > 0.08
    assert q["n"] == q["n_floor"] == 360
    assert q["frechet_ratio"] == pytest.approx(1.0, rel=1e-6)  # the held-out set *is* the floor
    noise = torch.rand(360, *DIGITS_IMG_SHAPE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    qn = digit_quality(noise, classifier)
    assert qn["frechet_ratio"] > 10 and qn["confident_share"] < 0.6
    assert math.isfinite(qn["frechet"])
