"""Plots written into the run folder: the learned schedule against the baselines, learning curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ld3.io import atomic_save_figure  # noqa: E402
from ld3.samplers.discretizations import SKIP_TYPES  # noqa: E402
from ld3.samplers.schedules import NoiseSchedule  # noqa: E402


def save_and_close(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write atomically, and free a figure."""
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=dpi)
    plt.close(fig)


def plot_schedule(schedule: NoiseSchedule, t: torch.Tensor, tp: torch.Tensor, path: Path, title: str = "") -> None:
    """lambda(t_i) of the learned discretization (and of t'_i) against the baseline schedules."""
    steps = t.numel() - 1
    fig, ax = plt.subplots(figsize=(6, 4))
    idx = range(steps + 1)
    for name, fn in SKIP_TYPES.items():
        ax.plot(idx, schedule.lambda_(fn(schedule, steps)).numpy(), "--", lw=1, alpha=0.7, label=name)
    ax.plot(idx, schedule.lambda_(t.double()).numpy(), "o-", color="k", lw=2, label="LD3 t")
    ax.plot(idx, schedule.lambda_(tp.double()).numpy(), "x", color="r", ms=8, label="LD3 t' (network)")
    ax.set_xlabel("step i")
    ax.set_ylabel("lambda(t_i) = log(alpha/sigma)")
    ax.set_title(title or f"learned discretization, {steps} steps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_and_close(fig, path)


def plot_curves(history: list[dict], path: Path) -> None:
    """Training loss per step and validation loss (and its best) per check."""
    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    va = [(h["step"], h["valid_loss"]) for h in history if "valid_loss" in h]
    be = [(h["step"], h["best_valid"]) for h in history if "best_valid" in h]
    if tr:
        ax.plot(*zip(*tr), lw=0.8, alpha=0.6, label="train (batch)")
    if va:
        ax.plot(*zip(*va), lw=1.2, label="validation")
    if be:
        ax.plot(*zip(*be), lw=1.5, color="k", label="best validation")
    for h0, h1 in zip(history, history[1:]):
        if h0.get("phase") == 1 and h1.get("phase") == 2:
            ax.axvline(h1["step"], color="gray", ls=":", label="phase 2")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("distance to teacher")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_and_close(fig, path)


def image_grid(rows: list[torch.Tensor], labels: list[str], path: Path, scale: int = 3) -> None:
    """Rows of images in [-1, 1] (each N x C x H x W) with a label per row."""
    n = max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(min(0.6 * n * scale / 3, 14), 0.75 * len(rows) * scale / 3 + 0.3),
                             squeeze=False)
    for ax, r, lab in zip(axes[:, 0], rows, labels):
        x = ((r.detach().float().cpu().clamp(-1, 1) + 1) / 2)
        c, h, w = x.shape[1:]
        strip = torch.ones(c, h, n * (w + 1))
        for j in range(x.shape[0]):
            strip[:, :, j * (w + 1):j * (w + 1) + w] = x[j]
        img = strip.permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    save_and_close(fig, path, dpi=100)
