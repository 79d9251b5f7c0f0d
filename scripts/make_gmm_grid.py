"""Write a grid of samples of the digits GMM (exact denoiser) drawn by a solver from noise.

    python scripts/make_gmm_grid.py                      # docs/digits_gmm_samples.png
    python scripts/make_gmm_grid.py --solver dpm_solver++ --steps 10 --out /tmp/grid.png

A visual check that the analytic model and the solvers produce digits: uni_pc (order 3) with
20 steps on the edm discretization, 64 samples, one seed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from ld3.models.analytic import digits_gmm_model  # noqa: E402
from ld3.samplers.discretizations import get_discretization  # noqa: E402
from ld3.samplers.solvers import solve  # noqa: E402

log = logging.getLogger("make_gmm_grid")


def sample_digits(n: int = 64, solver: str = "uni_pc", steps: int = 20, schedule: str = "ve",
                  skip_type: str = "edm", seed: int = 0) -> torch.Tensor:
    """n samples (n x 1 x 8 x 8, float64, roughly in [-1, 1]) of the digits GMM from unit noise."""
    model = digits_gmm_model(schedule)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *model.latent_shape, generator=gen, dtype=torch.float64)
    t = get_discretization(skip_type, model.schedule, steps)
    with torch.no_grad():
        return solve(solver, model.noise_fn, model.schedule, model.schedule.prior(z), t)


def save_grid(images: torch.Tensor, path: Path, columns: int = 8, scale: int = 8, gap: int = 2) -> None:
    """Save n x 1 x H x W images in [-1, 1] as one grey PNG (white gaps between tiles)."""
    from PIL import Image

    imgs = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()[:, 0]
    n, h, w = imgs.shape
    rows = -(-n // columns)
    tile_h, tile_w = h * scale + gap, w * scale + gap
    canvas = np.full((rows * tile_h + gap, columns * tile_w + gap), 255, dtype=np.uint8)
    for k, img in enumerate(imgs):
        r, c = divmod(k, columns)
        big = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
        top, left = gap + r * tile_h, gap + c * tile_w
        canvas[top: top + h * scale, left: left + w * scale] = big
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(canvas, mode="L").save(tmp, format="PNG")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "digits_gmm_samples.png")
    parser.add_argument("--solver", default="uni_pc")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--schedule", default="ve", choices=["ve", "vp_discrete"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    images = sample_digits(args.n, args.solver, args.steps, args.schedule, seed=args.seed)
    save_grid(images, args.out)
    log.info("wrote %d samples (%s, %d steps) to %s", args.n, args.solver, args.steps, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
