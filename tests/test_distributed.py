"""gen_data.py under torchrun (gloo, 2 CPU processes): the same files as one process, byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")

pytestmark = pytest.mark.slow


def gen(root: Path, *extra: str, ranks: int = 1, n: int = 23) -> Path:
    args = [str(ROOT / "gen_data.py"), "--all_config", CFG, "--total_samples", str(n), "--sampling_batch_size", "5",
            "--steps", "8", "--save_pt", "--save_png", "--data_dir", str(root), *extra]
    cmd = [sys.executable, *args] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "uni_pc_NFE8_edm_seed0"


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".pt", ".png")}


@pytest.mark.parametrize("noise", ["index", "paper"])
def test_two_ranks_write_the_files_of_one(tmp_path, noise):
    one = files(gen(tmp_path / "one", "--noise", noise))
    two = files(gen(tmp_path / "two", "--noise", noise, ranks=2))
    assert len(one) == 46 and one == two


def test_resume_with_another_number_of_ranks(tmp_path):
    """A run stopped after 12 samples (one process) and finished by two ranks: the files of one whole run."""
    gen(tmp_path / "r", n=12)
    resumed = files(gen(tmp_path / "r", ranks=2))
    assert resumed == files(gen(tmp_path / "whole"))


def test_sample_two_ranks_equal_one(tmp_path):
    """sample.py under torchrun: the same samples.npz, PNGs and metrics (distances reduced over ranks)."""
    out = {}
    for ranks in (1, 2):
        d = tmp_path / f"s{ranks}"
        args = [str(ROOT / "sample.py"), "--all_config", CFG, "--skip_type", "edm", "--steps", "4", "--num_samples",
                "23", "--sampling_batch_size", "5", "--save_png", "--out_dir", str(d)]
        cmd = [sys.executable, *args] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-3000:]
        out[ranks] = {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
                      if p.is_file() and p.name != "sample_config.yml"}
    assert len(out[1]) == 23 + 3 and out[1] == out[2]


def test_main_data_parallel_matches_one_process(tmp_path):
    """main.py under torchrun (2 ranks, each half of every batch, gradients all-reduced, decisions shared):
    the learned times equal a one-process run's to float rounding (measured 2.7e-5 relative; allowed 1e-3)."""
    import torch

    data = gen(tmp_path / "d", n=20)
    runs = {}
    for ranks in (1, 2):
        args = [str(ROOT / "main.py"), "--all_config", CFG, "--data_dir", str(data), "--num_train", "10",
                "--num_valid", "10", "--main_train_batch_size", "2", "--main_valid_batch_size", "5", "--steps", "4",
                "--visualize", "false", "--log_path", str(tmp_path / f"logs{ranks}")]
        cmd = [sys.executable, *args] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[ranks] = next((tmp_path / f"logs{ranks}").glob("uni_pc-N4-*"))
    a, b = (torch.load(runs[k] / "best_v2.pt", weights_only=True)["best_t_steps"].double() for k in (1, 2))
    assert float(((a - b).abs() / a).max()) < 1e-3
    log = (runs[2] / "log.txt").read_text()
    assert log.count("training finished") == 1  # rank 0 alone writes
