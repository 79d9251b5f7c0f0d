"""FID: the Frechet formula against an independent computation, reference files, the offline error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ld3.config import UserError
from ld3.fid import FID, INCEPTION_FILE, inception_features, inception_weights_path, load_ref_stats
from ld3.metrics import feature_stats, frechet_distance, frechet_from_stats

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")


def direct_fd(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a^1/2 S_b S_a^1/2)^1/2), via eigenvalues.

    Tr((S_a S_b)^1/2) equals the sum of the square roots of the eigenvalues of the symmetric matrix
    S_a^1/2 S_b S_a^1/2 (similar to S_a S_b): a different route from scipy's sqrtm of the product.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
    s_b = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


@pytest.mark.parametrize("dim", [1, 5, 32])
def test_frechet_matches_direct_computation(dim):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(300, dim)) @ rng.normal(size=(dim, dim))
    b = 0.7 * rng.normal(size=(250, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    want = direct_fd(a, b)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-7, abs=1e-9)
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    assert frechet_from_stats(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-7, abs=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6 * np.trace(np.atleast_2d(s1)))


def test_frechet_of_gaussians_closed_form():
    """Two isotropic Gaussians: FD = ||mu1 - mu2||^2 + D (s1 - s2)^2 (large samples)."""
    rng = np.random.default_rng(0)
    d = 4
    a = rng.normal(size=(200000, d)) * 2.0
    b = rng.normal(size=(200000, d)) * 0.5 + 1.0
    assert frechet_distance(a, b) == pytest.approx(d * 1.0 + d * (2.0 - 0.5) ** 2, rel=0.01)


class FakeInception(torch.nn.Module):
    """Stands in for Inception: a fixed projection of the uint8 pixels to 6 features."""

    def __init__(self, pixels: int):
        super().__init__()
        self.w = torch.randn(pixels * 3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.seen: list[tuple] = []

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.seen.append(tuple(x.shape))
        return (x.reshape(x.shape[0], -1).double() / 255 @ self.w,)


def test_fid_class_on_uint8_files(tmp_path):
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, size=(80, 8, 8, 1), dtype=np.uint8)
    gen = np.clip(ref.astype(int) + rng.integers(-40, 40, size=ref.shape), 0, 255).astype(np.uint8)
    net = FakeInception(64)
    want = frechet_distance(net(torch.from_numpy(gen).permute(0, 3, 1, 2).expand(-1, 3, -1, -1))[0].numpy(),
                            net(torch.from_numpy(ref).permute(0, 3, 1, 2).expand(-1, 3, -1, -1))[0].numpy())
    # EDM format: mu, sigma
    mu, sigma = feature_stats(inception_features(ref, net, torch.device("cpu"), batch=32))
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)
    fid = FID(tmp_path / "edm.npz", torch.device("cpu"), net=net, batch=32)
    assert fid(gen) == pytest.approx(want, rel=1e-9)
    assert all(s[1:] == (3, 8, 8) for s in net.seen), "grey images are fed as 3 channels"
    # images in [-1, 1] give the same number as their uint8 version
    as_float = torch.from_numpy(gen).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert fid(as_float) == pytest.approx(want, rel=1e-9)
    # ADM format: images plus mu/sigma (and the spatial statistics): the stored mu/sigma are used
    np.savez(tmp_path / "adm.npz", arr_0=gen, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
    m2, s2 = load_ref_stats(tmp_path / "adm.npz")
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    # images only: statistics computed from them
    np.savez(tmp_path / "imgs.npz", arr_0=ref)
    assert FID(tmp_path / "imgs.npz", torch.device("cpu"), net=net)(gen) == pytest.approx(want, rel=1e-9)


def test_bad_reference_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_ref_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "wrong.npz", features=np.zeros((3, 3)))
    with pytest.raises(UserError, match="expected mu and sigma"):
        load_ref_stats(tmp_path / "wrong.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable"):
        load_ref_stats(tmp_path / "junk.npz")
    np.savez(tmp_path / "dims.npz", mu=np.zeros(4), sigma=np.eye(4))
    fid = FID(tmp_path / "dims.npz", torch.device("cpu"), net=FakeInception(64))
    with pytest.raises(UserError, match="4-d statistics"):
        fid(np.zeros((5, 8, 8, 1), np.uint8))


def test_inception_weights_path_is_torch_hub_cache(monkeypatch, tmp_path):
    """Where torch-fidelity's load_state_dict_from_url looks: $TORCH_HOME/hub/checkpoints/<file>."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert inception_weights_path() == tmp_path / "hub" / "checkpoints" / INCEPTION_FILE
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert URL_INCEPTION_V3.endswith("/" + INCEPTION_FILE)


def test_fid_without_inception_weights_is_one_line(tmp_path, monkeypatch, capsys):
    """Offline (no proxy reachable), FID stops with the file name and where to put it, exit status 2."""
    import sample
    from ld3.config import run_cli

    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    hub = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(hub))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    rc = run_cli(sample.main, ["--all_config", CFG, "--skip_type", "edm", "--num_samples", "4", "--metrics", "fid",
                               "--ref_path", str(tmp_path / "ref.npz"), "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and INCEPTION_FILE in last
    assert str(hub / "hub" / "checkpoints" / INCEPTION_FILE) in last
    assert "Traceback" not in err and not (tmp_path / "out").exists()
