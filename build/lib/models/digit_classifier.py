"""The 8x8 digits data split and a small CNN classifier used to judge generated digits.

The split (``load_digits_split``) is shared by the embedded diffusion model and the
classifier: both train on the same 80 percent of scikit-learn's 1797 digits; the other
20 percent (360 images, stratified by class, fixed by ``split_seed``) is held out.

``DigitClassifier`` maps images in [-1, 1] (B x 1 x 8 x 8) to ``features(x)`` (the
64-dimensional penultimate layer, used for Frechet distances, like Inception features for
FID) and ``logits(x)`` (10 classes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "digit_classifier.safetensors"
SPLIT_SEED = 0
VALID_FRACTION = 0.2
NUM_CLASSES = 10


def digits_to_tensor(pixels: np.ndarray) -> Tensor:
    """Scale the digits' grey levels 0..16 linearly to [-1, 1]; N x 64 -> N x 1 x 8 x 8 float32."""
    x = torch.as_tensor(np.asarray(pixels, dtype=np.float32)) / 8.0 - 1.0
    return x.reshape(-1, 1, 8, 8)


def load_digits_split(split_seed: int = SPLIT_SEED,
                      valid_fraction: float = VALID_FRACTION) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``(x_train, y_train, x_valid, y_valid)`` of the scikit-learn digits.

    Images are N x 1 x 8 x 8 in [-1, 1], labels int64. The split is stratified by class and
    depends only on ``split_seed`` (default: 1437 train, 360 held out).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    idx_train, idx_valid = train_test_split(np.arange(len(data.target)), test_size=valid_fraction,
                                            random_state=split_seed, stratify=data.target)
    idx_train.sort()
    idx_valid.sort()
    x = digits_to_tensor(data.data)
    y = torch.as_tensor(data.target, dtype=torch.int64)
    return x[idx_train], y[idx_train], x[idx_valid], y[idx_valid]


class DigitClassifier(nn.Module):
    """conv3x3(32)-conv3x3(32)-pool-conv3x3(64)-pool-fc(64)-fc(10), ReLU activations.

    ``features`` is the fc(64) output before its ReLU; ``logits`` applies ReLU, dropout
    (training only) and the last layer to it.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, dropout: float = 0.3):
        super().__init__()
        self.arch = dict(width=width, feature_dim=feature_dim, dropout=dropout)
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4, feature_dim),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate layer before its ReLU, B x feature_dim (dense, no dead units: fits a Gaussian)."""
        return self.body(x.to(self.head.weight.dtype))

    def logits_from_features(self, f: Tensor) -> Tensor:
        return self.head(self.dropout(F.relu(f)))

    def logits(self, x: Tensor) -> Tensor:
        """Class scores, B x 10."""
        return self.logits_from_features(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 1000) -> tuple[Tensor, Tensor, Tensor]:
        """Return (features, probabilities, predicted labels) for images in [-1, 1]."""
        feats, probs = [], []
        for chunk in x.split(batch_size):
            f = self.features(chunk)
            feats.append(f)
            probs.append(F.softmax(self.logits_from_features(f), dim=1))
        p = torch.cat(probs)
        return torch.cat(feats), p, p.argmax(dim=1)


def load_digit_classifier(path: Path | str | None = None, device: torch.device | str = "cpu") -> DigitClassifier:
    """Load the shipped (or a re-trained) classifier in eval mode; architecture from its JSON card."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"digit classifier weights not found: {path} "
                                "(re-create them with scripts/train_digit_classifier.py)")
    arch: dict[str, Any] = {}
    card = path.with_suffix(".json")
    if card.is_file():
        arch = json.loads(card.read_text()).get("arch", {})
    net = DigitClassifier(**arch)
    net.load_state_dict(load_file(str(path), device="cpu"))
    return net.to(device).eval().requires_grad_(False)
