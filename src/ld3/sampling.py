"""The one batched sampling loop: gen_data.py, sample.py and the evaluation code all use it.

    for b in sample_batches(rollout, grid, chunks, draw, device):
        ...  # b.indices, b.z (CPU unit noise), b.c, b.uc, b.images (on the device, as the solver returns them)

``chunks`` are the batches as lists of sample indices (so that a resumed run computes every sample
in the batch it would have been in: the same arithmetic, the same bytes); ``draw(indices)`` gives
their unit noise and conditions. ``skip(indices)`` marks batches that are already done: they are
drawn (noise drawn in sequence, as the paper's, stays in step) but not computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

Draw = Callable[[list[int]], tuple[Tensor, Any, Any]]


@dataclass
class Batch:
    indices: list[int]
    z: Tensor
    c: Any
    uc: Any
    images: Tensor


def chunked(indices: Sequence[int], batch: int) -> list[list[int]]:
    idx = list(indices)
    return [idx[i:i + batch] for i in range(0, len(idx), batch)]


def sample_batches(rollout, grid, chunks: list[list[int]], draw: Draw, device: torch.device,
                   skip: Callable[[list[int]], bool] | None = None, desc: str | None = None,
                   leave: bool = True) -> Iterator[Batch]:
    """Images of every chunk not skipped, under ``torch.no_grad()``, with a progress bar when ``desc``."""
    todo = sum(len(c) for c in chunks if skip is None or not skip(c))
    with torch.no_grad(), tqdm(total=todo, desc=desc, unit="img", disable=None if desc else True,
                               leave=leave) as bar:
        for idx in chunks:
            z, c, uc = draw(idx)
            if skip is not None and skip(idx):
                continue
            images = rollout(z.to(device), grid, c, uc)
            yield Batch(idx, z, c, uc, images)
            bar.update(len(idx))


__all__ = ["Batch", "chunked", "sample_batches"]
