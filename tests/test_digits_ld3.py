"""LD3 on the embedded neural network (the digits U-Net): learned schedule ahead of every baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gen_data
import main as ld3_main
from ld3.config import parse_config
from ld3.discretization import load_learned_times
from ld3.evaluate import compare_with_baselines
from ld3.losses import l2_distance
from ld3.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits.yml")


@pytest.mark.slow
def test_ld3_on_digits_unet_beats_every_baseline(tmp_path):
    data = gen_data.main(["--all_config", CFG, "--total_samples", "100", "--sampling_batch_size", "100",
                          "--steps", "20", "--solver_name", "uni_pc", "--skip_type", "edm", "--save_pt",
                          "--data_dir", str(tmp_path / "data")])
    run = ld3_main.main(["--all_config", CFG, "--data_dir", str(data), "--solver_name", "uni_pc", "--steps", "4",
                         "--num_train", "50", "--num_valid", "50", "--log_path", str(tmp_path / "logs")])
    t, tp = load_learned_times(Path(run) / "best_v2.pt")
    cfg = {**parse_config(["--all_config", CFG, "--solver_name", "uni_pc", "--steps", "4"]), "data_dir": str(data),
           "visualize": False}
    model = build_model(cfg, torch.device("cpu"))
    assert model.name == "digits_unet"
    rows = compare_with_baselines(cfg, model, torch.device("cpu"), {"LD3": (t, tp)}, 300, l2_distance)
    for name in ("time_uniform", "time_quadratic", "logSNR", "edm"):
        assert rows["LD3"] < rows[name], (name, rows)
    assert rows["LD3"] < 0.5 * min(v for k, v in rows.items() if k != "LD3")
