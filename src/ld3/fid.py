"""Sample quality against references: FID (Inception pool features) and, for the 8x8 digits, the
Frechet distance in the feature space of the small digit classifier that ships with the project.

FID = ||mu - mu_ref||^2 + Tr(S + S_ref - 2 (S S_ref)^{1/2}) over the 2048-d pool3 features of the
Inception-v3 network of the TensorFlow FID code. The network is torch-fidelity's port
(``FeatureExtractorInceptionV3``, the same weights torchmetrics' ``FrechetInceptionDistance`` loads);
images go in as uint8 (the ``.npz`` values), resized to 299 x 299 inside the network.

Reference statistics (``--ref_path``) are ``.npz`` files with ``mu`` (2048) and ``sigma`` (2048 x 2048):
EDM's ``fid-refs/*.npz`` and ADM's ``VIRTUAL_*.npz`` reference batches both store those keys (ADM's also
has ``arr_0`` images and the spatial ``mu_s``/``sigma_s``, unused here). A file with only ``arr_0``
(N x H x W x C uint8 images) is accepted too: its statistics are computed here.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ld3.config import UserError
from ld3.metrics import feature_stats, frechet_from_stats

log = logging.getLogger("ld3")

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
DIGITS_SHAPE = (1, 8, 8)


def inception_weights_path() -> Path:
    """Where torch-fidelity (and torchmetrics) keep the Inception weights: torch hub's checkpoint cache,
    ``$TORCH_HOME/hub/checkpoints/`` (default ``~/.cache/torch/hub/checkpoints/``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def load_inception(device: torch.device, weights: str | Path | None = None):
    """torch-fidelity's Inception-v3 (2048-d pool features) in eval mode on ``device``.

    Uses ``weights`` if given, else the file in torch hub's cache, else downloads it there. When that
    fails (offline), a ``UserError`` names the file and where to place it.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UserError("FID needs the 'torch-fidelity' package: pip install torch-fidelity==0.4.0") from None
    path = Path(weights) if weights else inception_weights_path()
    if weights and not path.is_file():
        raise UserError(f"--inception_weights {path} not found; download {INCEPTION_URL} to it")
    try:
        local = str(path) if path.is_file() else None  # None: torch hub downloads it to its cache
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=local)
    except Exception as e:  # noqa: BLE001 - offline download failures come in many types
        raise UserError(f"FID could not load the Inception weights ({type(e).__name__}): place "
                        f"{INCEPTION_FILE} (from {INCEPTION_URL}) at {inception_weights_path()}, or pass "
                        "--inception_weights FILE") from None
    return net.to(device).eval()


@torch.no_grad()
def inception_features(imgs: np.ndarray | Tensor, net, device: torch.device, batch: int = 250) -> np.ndarray:
    """2048-d features of N x H x W x C uint8 images (or N x C x H x W in [-1, 1]); grey images -> RGB."""
    from ld3.data import to_uint8

    arr = to_uint8(imgs) if isinstance(imgs, Tensor) else np.asarray(imgs)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise UserError(f"FID needs N x H x W x C uint8 images with 1 or 3 channels, got {arr.dtype} "
                        f"{arr.shape}")
    out = []
    for i in range(0, len(arr), batch):
        x = torch.from_numpy(arr[i:i + batch]).permute(0, 3, 1, 2).to(device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        (f,) = net(x.contiguous())
        out.append(f.double().cpu().numpy())
    return np.concatenate(out)


def load_ref_stats(path: str | Path, net=None,
                   device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference ``.npz``: its ``mu``/``sigma``, or computed from its ``arr_0`` images."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--ref_path {p} not found: download the reference statistics (EDM: "
                        f"https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/<dataset>.npz; ADM: VIRTUAL_*.npz) "
                        "or pass another --ref_path")
    try:
        with np.load(p) as f:
            keys = set(f.files)
            if {"mu", "sigma"} <= keys:
                mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            elif "arr_0" in keys:
                if net is None:
                    raise UserError(f"--ref_path {p} holds images (arr_0) but no mu/sigma")
                mu, sigma = feature_stats(inception_features(f["arr_0"], net, device or torch.device("cpu")))
            else:
                raise UserError(f"--ref_path {p} has keys {sorted(keys)}; expected mu and sigma "
                                "(EDM / ADM format) or arr_0 images")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"--ref_path {p} is not a readable .npz file ({type(e).__name__})") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise UserError(f"--ref_path {p}: mu has shape {mu.shape} and sigma {sigma.shape}; "
                        "expected (D,) and (D, D)")
    return mu, sigma


class FID:
    """FID of image sets against one reference; the network and the reference statistics are loaded once.

    ``net`` replaces the Inception network (any module mapping B x 3 x H x W uint8 to a 1-tuple of
    B x D features, D matching the reference statistics).
    """

    def __init__(self, ref_path: str | Path | None, device: torch.device, weights: str | Path | None = None,
                 batch: int = 250, net=None):
        if not ref_path:
            raise UserError("FID needs --ref_path: an .npz with the reference mu and sigma (e.g. EDM's "
                            "fid-refs/cifar10-32x32.npz)")
        self.ref_path = Path(ref_path)
        if not self.ref_path.is_file():
            load_ref_stats(ref_path)  # the one-line error, before loading the network
        self.device, self.batch = device, batch
        self.net = net if net is not None else load_inception(device, weights)
        self.mu, self.sigma = load_ref_stats(ref_path, self.net, device)

    def __call__(self, imgs: np.ndarray | Tensor) -> float:
        return self.value(self.add(self.moments(), imgs))

    def moments(self):
        """An empty ``ld3.metrics.Moments`` of the reference's dimension, to ``add`` batches to."""
        from ld3.metrics import Moments

        return Moments(self.mu.size)

    def add(self, moments, imgs: np.ndarray | Tensor):
        """Add the Inception features of a batch of images to ``moments``; returns it."""
        feats = inception_features(imgs, self.net, self.device, self.batch)
        if feats.shape[1] != self.mu.size:
            raise UserError(f"--ref_path {self.ref_path} has {self.mu.size}-d statistics but the features "
                            f"are {feats.shape[1]}-d; FID references hold 2048-d Inception pool statistics")
        return moments.add(feats)

    def value(self, moments) -> float:
        """FID of the images behind ``moments`` (summed over processes first, if any) to the reference."""
        if moments.n < 2:
            raise UserError("FID needs at least 2 samples (50000 for numbers comparable with papers)")
        return frechet_from_stats(*moments.stats(), self.mu, self.sigma)


def is_digits(model: Any) -> bool:
    """Whether a model makes the 8x8 digits the digit classifier judges (digits_gmm, digits_unet)."""
    shape = tuple(model.info.get("img_shape", model.latent_shape))
    return model.info.get("dataset") == "digits" and shape == DIGITS_SHAPE


class DigitsJudge:
    """Digit-classifier metrics of 8x8 digit samples (``ld3.metrics.digit_quality``)."""

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0):
        try:
            from ld3.models.digit_classifier import load_digit_classifier, load_digits_split
        except ImportError:
            raise UserError("the digit metrics need models/digit_classifier.py, which this checkout "
                            "lacks") from None
        try:
            self.classifier = load_digit_classifier(device="cpu")
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
        x_tr, _, x_va, _ = load_digits_split()
        self.train, self.heldout, self.seed = x_tr, x_va, seed

    def __call__(self, imgs: Tensor) -> dict[str, Any]:
        """``confident_share``, ``class_histogram``, ``frechet`` (samples vs training digits) and
        ``frechet_floor`` (held-out vs training digits), see ``digit_quality``."""
        tally = self.tally(len(imgs))
        self.add(tally, 0, imgs)
        return self.value(tally)

    def tally(self, n_total: int):
        """An empty ``ld3.metrics.DigitTally`` for ``n_total`` samples, filled by ``add``."""
        from ld3.metrics import DigitTally

        return DigitTally(self.classifier, n_total, len(self.train), len(self.heldout))

    def add(self, tally, start: int, imgs: Tensor) -> None:
        if tuple(imgs.shape[1:]) != DIGITS_SHAPE:
            raise UserError(f"digit metrics need 1 x 8 x 8 images, got {tuple(imgs.shape[1:])}")
        tally.add(start, imgs)

    def value(self, tally) -> dict[str, Any]:
        """The metrics of the samples behind ``tally`` (summed over processes first, if any)."""
        from ld3.metrics import digit_quality

        return digit_quality(None, self.classifier, self.train, self.heldout, seed=self.seed, tally=tally)
