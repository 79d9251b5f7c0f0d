#!/usr/bin/env python3
"""The whole LD3 story on the embedded digits models, on a laptop CPU (`make demo`).

For the EDM U-Net (configs/digits.yml: 100 teacher samples, uni_pc and ipndm at NFE 4 and 6) and
then the rectified-flow U-Net (configs/digits_flow.yml: 200 teacher samples, uni_pc at NFE 4, 6, 8):

1. teacher data: UniPC 20 NFE on the grid of the config's ``teacher`` (gen_data.py);
2. LD3 for each solver and NFE on half the samples, validated on the other half (main.py);
3. on fresh noise, distance to the teacher and digit Fréchet distance of LD3 and of every
   hand-made schedule; a table (printed, and summary.md: logs/demo/ and logs/demo/flow/), an
   image grid and the schedule plot in each run folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from ld3.cli import gen_data  # noqa: E402
from ld3.cli import main as ld3_main  # noqa: E402
from ld3.config import UserError, parse_config  # noqa: E402
from ld3.discretization import load_learned_times  # noqa: E402
from ld3.evaluate import parse_teacher, baseline_names, fresh_noise, images, teacher_images  # noqa: E402
from ld3.io import atomic_write_text  # noqa: E402
from ld3.losses import l2_distance  # noqa: E402
from ld3.plots import image_grid  # noqa: E402
from ld3.runtime import baseline_times, setup_device_and_model  # noqa: E402
from ld3.student import SolverSpec  # noqa: E402
from ld3.samplers.solvers import steps_for_nfe  # noqa: E402

log = logging.getLogger("ld3")


def digit_metric():
    """Fréchet distance in the shipped digit classifier's features (None if it is missing)."""
    try:
        from ld3.metrics import digit_quality
        from ld3.models.digit_classifier import load_digit_classifier

        clf = load_digit_classifier()
    except (ImportError, FileNotFoundError):
        return None
    return lambda x: digit_quality(x, clf)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="one config only (default: digits.yml, then digits_flow.yml)")
    ap.add_argument("--out", default="logs/demo")
    ap.add_argument("--solvers", nargs="+", default=None, help="default: uni_pc ipndm (U-Net), uni_pc (flow)")
    ap.add_argument("--nfe", nargs="+", type=int, default=None, help="default: 4 6 (U-Net), 4 6 8 (flow)")
    ap.add_argument("--n_teacher", type=int, default=None, help="default: the config's total_samples")
    ap.add_argument("--n_fresh", type=int, default=500)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    if args.config:
        jobs = [(args.config, args.solvers or ["uni_pc", "ipndm"], args.nfe or [4, 6], out)]
    else:
        jobs = [(str(ROOT / "configs" / "digits.yml"), args.solvers or ["uni_pc", "ipndm"], args.nfe or [4, 6], out),
                (str(ROOT / "configs" / "digits_flow.yml"), args.solvers or ["uni_pc"], args.nfe or [4, 6, 8],
                 out / "flow")]
    for config, solvers, nfes, where in jobs:
        demo(config, solvers, nfes, args.n_teacher, args.n_fresh, where)
    return 0


def demo(config: str, solvers: list[str], nfes: list[int], n_teacher: int | None, n_fresh: int, out: Path) -> None:
    """Teacher data (``n_teacher`` samples, default the config's total_samples), LD3 for each solver and
    NFE, and the table against every baseline, for one config."""
    t0 = time.time()
    base = parse_config(["--all_config", config])
    n_teacher = n_teacher or int(base["total_samples"])
    teacher_skip = parse_teacher(base["teacher"]).get("skip_type", "edm")
    print(f"== 1. teacher data ({n_teacher} samples, uni_pc 20 NFE, {teacher_skip}) with {config}")
    data = gen_data.main(["--all_config", config, "--total_samples", str(n_teacher),
                          "--sampling_batch_size", str(n_teacher), "--steps", "20", "--solver_name", "uni_pc",
                          "--skip_type", teacher_skip, "--save_pt", "--save_png", "--data_dir", str(out / "train_data")])
    half = n_teacher // 2
    quality = digit_metric()
    table: dict[str, dict[str, str]] = {}
    cols: list[str] = []
    for solver in solvers:
        for nfe in nfes:
            col = f"{solver} NFE {nfe}"
            cols.append(col)
            print(f"== 2. LD3: {col}")
            run = ld3_main.main(["--all_config", config, "--data_dir", str(data), "--solver_name", solver,
                                 "--steps", str(nfe), "--num_train", str(half), "--num_valid", str(half),
                                 "--log_path", str(out / "runs")])
            cfg = {**parse_config(["--all_config", config, "--solver_name", solver, "--steps", str(nfe)]),
                   "data_dir": str(data)}
            device, model = setup_device_and_model(cfg)
            z, c, uc = fresh_noise(cfg, model, n_fresh, device)
            teacher = teacher_images(cfg, model, z, c, uc, 250, device)
            spec = SolverSpec.from_cfg(cfg)
            S = steps_for_nfe(solver, nfe)
            candidates = {"LD3": load_learned_times(Path(run) / "best_v2.pt")}
            for name in baseline_names(cfg, model):
                candidates[name] = (baseline_times(cfg, model, name, S, nfe), None)
            grid_rows, grid_labels = [teacher[:12]], ["teacher (20 NFE)"]
            for name, (t, tp) in candidates.items():
                im = images(model, spec, t, tp, z, c, uc, 250, device)
                cell = f"{float(l2_distance(im, teacher).mean()):.4f}"
                if quality is not None:
                    cell += f" / {quality(im)['frechet_matched']:.1f}"
                table.setdefault(name, {})[col] = cell
                grid_rows.append(im[:12])
                grid_labels.append(name)
            image_grid(grid_rows, grid_labels, Path(run) / "samples_grid.png")
            print(f"   run folder: {run} (schedule.png, samples_grid.png, curves.png)")
    if quality is not None:
        teacher_q = quality(teacher)
        floor = (f"Digit Fréchet distance: the first {teacher_q['n_floor']} samples against as many training digits; "
                 f"the teacher (uni_pc 20 NFE) scores {teacher_q['frechet_matched']:.1f}, the floor (held-out real "
                 f"digits against the same training digits) {teacher_q['frechet_floor']:.1f}.")
    else:
        floor = "digit classifier not available: Fréchet distance skipped"
    head = "| discretization | " + " | ".join(cols) + " |"
    lines = [f"{model.name}: distance to the teacher (L2, mean over {n_fresh} fresh noises)"
             + (" / digit Fréchet distance" if quality else "") + "; lower is better.", "", head,
             "|---" * (len(cols) + 1) + "|"]
    for name in sorted(table, key=lambda n: (n != "LD3", n)):
        lines.append(f"| {name} | " + " | ".join(table[name].get(c, "-") for c in cols) + " |")
    lines += ["", floor, "", f"Whole demo: {time.time() - t0:.0f} s on {torch.get_num_threads()} thread(s)."]
    text = "\n".join(lines)
    atomic_write_text(out / "summary.md", text + "\n")
    print("\n" + text)
    print(f"\n(saved to {out / 'summary.md'})")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
