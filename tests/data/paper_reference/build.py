"""Build the compact copies in this folder from the paper-code reference package.

    python tests/data/paper_reference/build.py /path/to/shared/paper_reference [/path/to/extracted/seed1]

The package (``shared/paper_reference``, see its README) holds outputs of the paper's code
(vinhsuhi/LD3 @ 9e4a66f, unmodified, CPU, torch 2.14.1) on the digits mixture. This script only
repacks them (smaller, weights_only-loadable); it computes nothing. Run once by a maintainer; the
tests read the files it writes, never the package.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
N_SOLVER_LATENTS = 4  # of the 8 in solvers.pt: enough rows, a quarter of the size


def _teacher(folder: Path) -> dict:
    files = sorted(folder.glob("latent_*.pt"))
    rows = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    return {"latent": torch.stack([r["latent"] for r in rows]), "img": torch.stack([r["img"] for r in rows]),
            "files": [f.name for f in files]}


def main(src: Path, seed1: Path | None = None) -> None:
    shutil.copyfile(src / "gmm_digits_diag40.pt", HERE / "gmm_digits_diag40.pt")
    s = torch.load(src / "solvers.pt", weights_only=True)
    n = N_SOLVER_LATENTS
    runs = []
    for r in s["runs"]:
        keep = {k: r[k] for k in ("key", "solver_name", "order", "unipc_variant", "grid", "nfe", "status",
                                  "model_calls")}
        keep.update(t=r["t"], t2=r["t2"])
        keep["output"] = None if r["output"] is None else r["output"][:n].clone()
        runs.append(keep)
    torch.save({"source": "shared/paper_reference/solvers.pt (paper code Generator.sample, see its solvers.md)",
                "latents": s["latents"][:n].clone(), "teacher_img": s["teacher_img"][:n].clone(),
                "learned_grid": {"t": s["learned_grid"]["t"], "t2": s["learned_grid"]["t2"],
                                 "source": s["learned_grid"]["source"]},
                "runs": runs, "baselines": s["baselines"], "baseline_args": s["baseline_args"]},
               HERE / "solvers_ref.pt")
    torch.save(_teacher(src / "teacher" / "uni_pc_NFE20_edm_seed0"), HERE / "teacher_seed0.pt")
    seed1 = seed1 or src / "teacher" / "uni_pc_NFE20_edm_seed1"
    torch.save(_teacher(seed1), HERE / "teacher_seed1.pt")
    training = {}
    for run in ("uni_pc_N4", "dpm_solver++_N6"):
        d = src / "training" / run
        ev = json.loads((d / "steps.json").read_text())["events"]
        val = [e for e in ev if e["kind"] == "validation" and e["source"] == "examine"]
        ckpt = torch.load(d / "best_v2.pt", map_location="cpu", weights_only=True)
        ev_json = json.loads((d / "eval.json").read_text())
        lines = (d / "command.txt").read_text().splitlines()
        out_line = next(x for x in lines if x.startswith("# -> "))
        training[run] = {
            "command": lines[2],
            "run_name": out_line.split()[2].rstrip("/").split("/")[-1],
            "validation_losses": [e["loss"] for e in val[:41]],
            "validation_iters": [e["iter"] for e in val[:41]],
            "best_t_steps": ckpt["best_t_steps"].tolist(),
            "eval": ev_json,
        }
        shutil.copyfile(d / "best_v2.pt", HERE / f"{run}_best_v2.pt")
    (HERE / "training_ref.json").write_text(json.dumps(training, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
