"""Sample-quality metrics: Frechet distance in a feature space, and a digit-quality report.

Frechet distance between two Gaussians fitted to features (the formula behind FID)::

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})

with ``mu`` the feature means and ``S`` the (unbiased, N - 1) covariances. For the embedded
8x8 digits model the features come from the small digit classifier
(``models.digit_classifier``) instead of Inception.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

log = logging.getLogger(__name__)


def _as_numpy(feats: Any) -> np.ndarray:
    if isinstance(feats, Tensor):
        feats = feats.detach().cpu().numpy()
    a = np.asarray(feats, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"features must be a 2-D array (samples x dims), got shape {a.shape}")
    return a


def feature_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``mu = mean_i f_i`` and covariance ``S = sum_i (f_i - mu)(f_i - mu)^T / (N - 1)``."""
    a = _as_numpy(feats)
    return a.mean(axis=0), np.cov(a, rowvar=False)


class Moments:
    """Count, sum and sum of outer products of feature rows, in float64: the Frechet statistics of a
    sample set built batch by batch, and summed over processes (``reduce``) before ``stats``, so a
    torchrun job's FID is the one-process value up to the order of the float64 sums."""

    def __init__(self, dim: int):
        self.n, self.sum, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, feats: Any) -> "Moments":
        a = _as_numpy(feats)
        if a.shape[1] != self.sum.size:
            raise ValueError(f"features have {a.shape[1]} dims, the statistics {self.sum.size}")
        self.n += len(a)
        self.sum += a.sum(axis=0)
        self.outer += a.T @ a
        return self

    def reduce(self, place: Any) -> "Moments":
        """Sum over the processes of ``place`` (a ``ld3.distributed.Place``); a no-op in one process."""
        if getattr(place, "active", False):
            flat = place.sum_array(np.concatenate([[float(self.n)], self.sum, self.outer.ravel()]))
            d = self.sum.size
            self.n, self.sum, self.outer = int(round(flat[0])), flat[1:1 + d], flat[1 + d:].reshape(d, d)
        return self

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, S)`` as ``feature_stats`` gives them (unbiased covariance)."""
        if self.n < 2:
            raise ValueError(f"Frechet statistics need at least 2 samples, got {self.n}")
        mu = self.sum / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def frechet_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray,
                       eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + Tr(s1 + s2 - 2 sqrtm(s1 s2))`` (real part of the matrix square root).

    If ``sqrtm(s1 s2)`` is not finite (near-singular product), ``eps * I`` is added to both
    covariances first, as in the reference FID code.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics do not match: {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        log.warning("sqrtm(s1 s2) not finite; adding %g to the covariance diagonals", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a x D and N_b x D)."""
    mu1, s1 = feature_stats(feats_a)
    mu2, s2 = feature_stats(feats_b)
    return frechet_from_stats(mu1, s1, mu2, s2)


def _subset(n_total: int, n: int, seed: int) -> Tensor:
    """First ``n`` entries of a fixed permutation of ``range(n_total)`` (nested across ``n``)."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


class DigitTally:
    """What ``digit_quality`` needs, gathered batch by batch (and summed over processes by ``reduce``):
    confident and per-class counts, and the classifier-feature moments of the first ``n`` and first
    ``k`` samples (the ``frechet`` and ``frechet_matched`` sets) of ``n_total``."""

    def __init__(self, classifier: Any, n_total: int, n_train: int, n_held: int):
        self.classifier, self.n_total = classifier, int(n_total)
        self.n = min(self.n_total, n_train)
        self.k = min(self.n_total, n_held, n_train)
        self.counts = np.zeros(12)  # [samples, confident, class 0..9]
        # the feature dimension up front: a rank that samples no batch still takes part in ``reduce``
        with torch.no_grad():
            dim = classifier.predict(torch.zeros(1, 1, 8, 8))[0].shape[1]
        self.first_n, self.first_k = Moments(dim), Moments(dim)

    @torch.no_grad()
    def add(self, start: int, images: Tensor) -> None:
        """Samples ``start .. start + len(images) - 1`` (N x 1 x 8 x 8 in [-1, 1]; clamped)."""
        feats, probs, pred = self.classifier.predict(images.detach().float().cpu().clamp(-1, 1))
        f = feats.double().cpu().numpy()
        self.counts[0] += len(images)
        self.counts[1] += float((probs.max(dim=1).values > 0.9).sum())
        self.counts[2:] += torch.bincount(pred, minlength=10).double().numpy()
        for m, upto in ((self.first_n, self.n), (self.first_k, self.k)):
            if start < upto:
                m.add(f[:upto - start])

    def reduce(self, place: Any) -> "DigitTally":
        if getattr(place, "active", False):
            self.counts = place.sum_array(self.counts)
            self.first_n.reduce(place)
            self.first_k.reduce(place)
        return self


@torch.no_grad()
def digit_quality(images: Tensor, classifier: Any, train_images: Tensor | None = None,
                  heldout_images: Tensor | None = None, seed: int = 0, tally: DigitTally | None = None
                  ) -> dict[str, Any]:
    """Judge generated 8x8 digits (N x 1 x 8 x 8, in [-1, 1]; clamped to it first).

    Returns a dict:

    - ``confident_share``: share of samples whose largest softmax probability is > 0.9.
    - ``class_histogram``: share of samples per predicted class (10 numbers, sum 1).
    - ``frechet``: FD between the N samples and N training digits (a fixed subset;
      with more samples than training digits, the first ``len(train)`` samples are used).
    - ``frechet_floor``: FD between K held-out real digits and K training digits,
      K = min(N, number held out): what a perfect generator would score at that count.
    - ``frechet_matched``: FD between the first K samples and the same K training digits,
      and ``frechet_ratio = frechet_matched / frechet_floor`` (1 = as good as real data).
    - ``n``, ``n_floor``: the sample counts behind ``frechet`` and the floor.

    ``train_images`` / ``heldout_images`` default to the split of
    ``models.digit_classifier.load_digits_split``. Subsets are fixed by ``seed``. With ``tally`` (a
    ``DigitTally`` filled batch by batch, over processes) ``images`` is not used: pass None.
    """
    if train_images is None or heldout_images is None:
        from ld3.models.digit_classifier import load_digits_split

        x_tr, _, x_va, _ = load_digits_split()
        train_images = x_tr if train_images is None else train_images
        heldout_images = x_va if heldout_images is None else heldout_images
    if tally is None:
        if images.ndim != 4 or images.shape[1:] != train_images.shape[1:]:
            raise ValueError(f"images must be N x {tuple(train_images.shape[1:])}, got {tuple(images.shape)}")
        tally = DigitTally(classifier, len(images), len(train_images), len(heldout_images))
        tally.add(0, images)
    f_train, _, _ = classifier.predict(train_images)
    f_held, _, _ = classifier.predict(heldout_images)
    n_samples, n, k = int(round(tally.counts[0])), tally.n, tally.k

    train_sub = _subset(len(train_images), len(train_images), seed)
    held_sub = _subset(len(heldout_images), k, seed + 1)

    def versus_train(m: Moments, count: int) -> float:
        return frechet_from_stats(*m.stats(), *feature_stats(f_train[train_sub[:count]]))

    floor = frechet_distance(f_held[held_sub], f_train[train_sub[:k]])
    matched = versus_train(tally.first_k, k)
    hist = tally.counts[2:] / n_samples
    return dict(
        confident_share=float(tally.counts[1] / n_samples),
        class_histogram=[round(float(h), 4) for h in hist],
        frechet=versus_train(tally.first_n, n),
        frechet_floor=floor,
        frechet_matched=matched,
        frechet_ratio=matched / floor if floor > 0 else float("inf"),
        n=n,
        n_floor=k,
    )
