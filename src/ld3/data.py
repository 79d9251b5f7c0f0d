"""Teacher data: per-index noise, and the sample files (``latent_{index:06d}.pt``) <-> tensors.

A sample file is a dict of tensors, as the paper's code writes it: ``latent`` (unit Gaussian noise
before the prior transformation, the model's latent shape), ``img`` (the teacher's decoded output
as the solver returns it, nominally in [-1, 1] but not clamped, in the solver's dtype: float64 from
the paper's code and under ``--arithmetic paper``), ``c`` and ``uc`` (condition / unconditional
condition, or None). Only PNGs and 8-bit metrics clamp.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ld3.config import UserError
from ld3.models.base import index_generator
from ld3.io import _atomic_write_bytes, atomic_torch_save, safe_load

FILE_PATTERN = "latent_*.pt"


TRAIN_STREAM, EVAL_STREAM = 0, 2  # teacher data / fresh evaluation noise (stream 1: class labels)


def noise_for_indices(seed: int, indices: Sequence[int], shape: Sequence[int], stream: int = TRAIN_STREAM) -> Tensor:
    """Unit Gaussian noise, one row per index, float32 on the CPU; evaluation uses its own stream."""
    return torch.stack([torch.randn(tuple(shape), generator=index_generator(seed, i, stream)) for i in indices])


def sample_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"latent_{index:06d}.pt"


def _row(v: Any, i: int) -> Any:
    if v is None:
        return None
    if isinstance(v, Tensor):
        return v[i].detach().cpu().clone()
    return v[i]


def save_sample(folder: Path, index: int, latent: Tensor, img: Tensor, c: Any = None, uc: Any = None) -> Path:
    path = sample_path(folder, index)
    atomic_torch_save({"latent": latent.detach().cpu().clone(), "img": img.detach().cpu().clone(),
                       "c": c, "uc": uc}, path)
    return path


def save_pngs(folder: Path, indices: Sequence[int], imgs: Tensor, mode: str = "round") -> None:
    """Images (N x C x H x W in [-1, 1]) as ``{index:06d}.png``, converted to 8 bits in one go."""
    from PIL import Image

    for i, arr in zip(indices, to_uint8(imgs, mode)):
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
        _atomic_write_bytes(Path(folder) / f"{i:06d}.png", buf.getvalue())


def to_uint8(img: Tensor, mode: str = "round") -> np.ndarray:
    """B x C x H x W in [-1, 1] -> B x H x W x C uint8 (the layout FID tools read), clamped.

    ``round``: to the nearest level (EDM's generate.py); ``paper``: truncated, as the paper's gen_data.py
    (``clip((x + 1) / 2 * 255, 0, 255).astype(uint8)``)."""
    if mode == "paper":
        a = np.clip(((img.detach().cpu() + 1.0) / 2.0).permute(0, 2, 3, 1).numpy() * 255.0, 0, 255)
        return a.astype(np.uint8)
    x = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


@dataclass
class SampleSet:
    latent: Tensor  # N x latent shape (unit noise)
    img: Tensor  # N x C x H x W, as the teacher returned it (not clamped)
    c: Any
    uc: Any
    files: list[Path]

    def __len__(self) -> int:
        return self.latent.shape[0]

    def subset(self, idx: Sequence[int] | slice) -> "SampleSet":
        if isinstance(idx, slice):
            idx = list(range(len(self)))[idx]
        idx = list(idx)

        def pick(v):
            if v is None:
                return None
            if isinstance(v, Tensor):
                return v[idx]
            return [v[i] for i in idx]

        return SampleSet(self.latent[idx], self.img[idx], pick(self.c), pick(self.uc), [self.files[i] for i in idx])


def _stack(values: list, name: str, path_of: list[Path]) -> Any:
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise UserError(f"sample files disagree: some have {name!r} and some not (e.g. {path_of[0]})")
    if all(isinstance(v, Tensor) for v in values):
        try:
            return torch.stack(values)
        except RuntimeError:
            raise UserError(f"sample files have {name!r} tensors of different shapes; regenerate the data") from None
    return values


def list_sample_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data_dir {folder} does not exist: run gen_data.py first and pass the generated "
                        f"folder (e.g. train_data/<solver>_NFE20_edm_seed0)")
    files = sorted(folder.glob(FILE_PATTERN))
    if not files:
        sub = sorted(p.name for p in folder.iterdir() if p.is_dir())
        hint = f"; its subfolders: {', '.join(sub[:5])}" if sub else ""
        raise UserError(f"data_dir {folder} has no {FILE_PATTERN} files{hint}")
    return files


def load_samples(folder: Path, count: int, latent_shape: Sequence[int] | None = None,
                 img_shape: Sequence[int] | None = None) -> SampleSet:
    """The first ``count`` sample files of ``folder`` (sorted by name), checked and stacked."""
    files = list_sample_files(folder)
    if len(files) < count:
        raise UserError(f"data_dir {folder} has {len(files)} samples but {count} are needed "
                        f"(num_train + num_valid): generate more with gen_data.py --total_samples {count}")
    files = files[:count]
    for expected, f in enumerate(files):  # the split is by index, as the paper's: a gap would shift it
        if f.name != sample_path(folder, expected).name:
            raise UserError(f"data_dir {folder}: {sample_path(folder, expected).name} is missing (found {f.name} "
                            f"in its place), so the train/valid split would shift; regenerate it with gen_data.py "
                            "on the same folder")
    rows = []
    for f in files:
        d = safe_load(f, "sample file")
        if not isinstance(d, dict) or not isinstance(d.get("latent"), Tensor) or not isinstance(d.get("img"), Tensor):
            raise UserError(f"sample file {f} is not a valid sample (needs tensors 'latent' and 'img'); regenerate it")
        lat, img = d["latent"], d["img"]
        if lat.ndim == len(latent_shape or lat.shape) + 1 and lat.shape[0] == 1:
            lat = lat[0]
        if img.ndim == 4 and img.shape[0] == 1:
            img = img[0]
        if latent_shape is not None and tuple(lat.shape) != tuple(latent_shape):
            raise UserError(f"sample file {f}: latent has shape {tuple(lat.shape)} but the model expects "
                            f"{tuple(latent_shape)}; the data was made for another model or config")
        if img_shape is not None and tuple(img.shape) != tuple(img_shape):
            raise UserError(f"sample file {f}: img has shape {tuple(img.shape)} but the model produces "
                            f"{tuple(img_shape)}; the data was made for another model or config")
        rows.append((lat, img, d.get("c"), d.get("uc")))
    return SampleSet(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                     _stack([r[2] for r in rows], "c", files), _stack([r[3] for r in rows], "uc", files), files)
