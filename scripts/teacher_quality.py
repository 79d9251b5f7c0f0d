#!/usr/bin/env python3
"""Quality of the embedded digits U-Net's teacher (UniPC, 20 NFE, edm) over several noise seeds.

    python scripts/teacher_quality.py [--config configs/digits.yml] [--seeds 10] [--n 1000]

Per seed: share classified with confidence > 0.9, smallest / largest class share, Fréchet distance
in the digit classifier's features (n samples vs n training digits), and at 360 samples (the size
of the held-out split) the Fréchet distance, the floor (held-out real digits vs training digits)
and their ratio; then the mean, min and max over seeds.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from ld3.config import parse_config  # noqa: E402
from ld3.data import EVAL_STREAM, noise_for_indices  # noqa: E402
from ld3.evaluate import images  # noqa: E402
from ld3.metrics import digit_quality  # noqa: E402
from ld3.runtime import baseline_times, setup_device_and_model  # noqa: E402
from ld3.student import SolverSpec  # noqa: E402
from ld3.models.digit_classifier import load_digit_classifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "digits.yml"))
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    logging.disable(logging.INFO)
    cfg = parse_config(["--all_config", args.config, "--steps", "20", "--solver_name", "uni_pc"])
    device, model = setup_device_and_model(cfg)
    clf = load_digit_classifier()
    t = baseline_times(cfg, model, "edm", 20, 20)
    cols = ["confident", "min class", "max class", f"FD {args.n}", "FD 360", "floor 360", "ratio"]
    print("seed | " + " | ".join(cols))
    rows = []
    for s in range(args.seeds):
        z = noise_for_indices(s, range(args.n), model.latent_shape, EVAL_STREAM)
        im = images(model, SolverSpec.from_cfg(cfg), t, None, z, None, None, 500, device)
        q, q360 = digit_quality(im, clf, seed=s), digit_quality(im[:360], clf, seed=s)
        rows.append([q["confident_share"], min(q["class_histogram"]), max(q["class_histogram"]), q["frechet"],
                     q360["frechet_matched"], q360["frechet_floor"],
                     q360["frechet_matched"] / q360["frechet_floor"]])
        print(f"{s} | " + " | ".join(f"{v:.3f}" for v in rows[-1]), flush=True)
    a = np.array(rows)
    for name, v in (("mean", a.mean(0)), ("min", a.min(0)), ("max", a.max(0))):
        print(f"{name} | " + " | ".join(f"{x:.3f}" for x in v))


if __name__ == "__main__":
    main()
