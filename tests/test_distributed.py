"""The three CLIs under torchrun (gloo, 2 CPU processes): the files of one process, byte for byte; the
same metrics and schedules; a killed rank stops the job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")

pytestmark = pytest.mark.slow


def gen(root: Path, *extra: str, ranks: int = 1, n: int = 23, extra_steps: bool = False) -> Path:
    bs = "2" if extra_steps else "5"  # the killed-rank test's batches
    args = [str(ROOT / "gen_data.py"), "--all_config", CFG, "--total_samples", str(n), "--sampling_batch_size", bs,
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


FAKE_INCEPTION = """
import torch
import ld3.fid


class FakeInception(torch.nn.Module):
    # a fixed random 64-d feature map of uint8 images, standing in for Inception (no weights offline)
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(64, 3 * 8 * 8, generator=g) / 8, requires_grad=False)

    def forward(self, x):
        return (torch.tanh(x.float().flatten(1) / 127.5 - 1) @ self.w.t(),)


ld3.fid.load_inception = lambda device, weights=None: FakeInception().to(device)
"""


def test_sample_two_ranks_equal_one(tmp_path):
    """sample.py under torchrun: the same samples.npz and PNGs, and every metric (teacher distances, FID,
    digit metrics) from statistics summed over ranks, equal to the one-process value to 1e-6."""
    import json

    import numpy as np

    plugin = tmp_path / "fake_inception.py"
    plugin.write_text(FAKE_INCEPTION)
    g = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=g.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    out = {}
    for ranks in (1, 2):
        d = tmp_path / f"s{ranks}"
        args = [str(ROOT / "sample.py"), "--all_config", CFG, "--skip_type", "edm", "--steps", "4", "--num_samples",
                "23", "--sampling_batch_size", "5", "--save_png", "--out_dir", str(d), "--plugins", str(plugin),
                "--metrics", "teacher,fid,digits", "--ref_path", str(tmp_path / "ref.npz")]
        cmd = [sys.executable, *args] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-3000:]
        out[ranks] = {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
                      if p.is_file() and p.name not in ("sample_config.yml", "metrics.json")}
        out[ranks]["metrics"] = json.loads((d / "metrics.json").read_text())
    m1, m2 = out[1].pop("metrics"), out[2].pop("metrics")
    assert len(out[1]) == 23 + 2 and out[1] == out[2]  # PNGs, samples.npz, grid.png

    def numbers(m, prefix=""):
        for k, v in m.items():
            if isinstance(v, dict):
                yield from numbers(v, f"{prefix}{k}.")
            elif isinstance(v, list):
                yield from ((f"{prefix}{k}[{i}]", x) for i, x in enumerate(v))
            else:
                yield f"{prefix}{k}", v

    a, b = dict(numbers(m1)), dict(numbers(m2))
    assert a.keys() == b.keys() and {"fid", "digits.frechet", "digits.frechet_matched", "teacher.L2"} <= a.keys()
    for k in a:
        if isinstance(a[k], float):
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-12), k
        else:
            assert a[k] == b[k], k
    assert a["fid"] > 0 and a["digits.frechet"] > 0


def test_sample_with_a_rank_that_gets_no_batch(tmp_path):
    """One batch for two ranks: rank 1 samples nothing yet joins every sum; the metrics are rank 0's alone."""
    import json

    d = tmp_path / "s"
    args = [str(ROOT / "sample.py"), "--all_config", CFG, "--skip_type", "edm", "--steps", "4", "--num_samples",
            "4", "--sampling_batch_size", "5", "--metrics", "teacher,digits", "--out_dir", str(d)]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        *args], capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((d / "metrics.json").read_text())
    assert m["num_samples"] == 4 and m["teacher"]["samples"] == 4 and m["digits"]["n"] == 4


def _rank_pids(marker: str, rank: int) -> list[int]:
    """Process ids of the workers whose command line holds ``marker`` and whose RANK is ``rank``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace") and \
                    f"RANK={rank}" in (proc / "environ").read_bytes().decode(errors="replace").split("\0"):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_stops_the_others_and_the_folder_resumes(tmp_path):
    """gen_data under torchrun, rank 1 killed (SIGKILL) mid-run: the job ends within seconds (no hang), rank 0
    says why in one line and exits non-zero, every file left is whole, and one process finishes the folder
    to the files of an uninterrupted run."""
    import signal
    import time

    root = tmp_path / "k"
    args = [str(ROOT / "gen_data.py"), "--all_config", CFG, "--total_samples", "1500", "--sampling_batch_size", "2",
            "--steps", "8", "--save_pt", "--data_dir", str(root)]
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    folder = root / "uni_pc_NFE8_edm_seed0"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(folder.glob("*.pt"))) < 20:
        time.sleep(0.05)
    victims = _rank_pids(str(root), 1)
    assert victims, "rank 1 not found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed = time.time()
    _, err = job.communicate(timeout=60)
    assert time.time() - killed < 30 and job.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "another process" in ours[0], err[-3000:]
    left = files(folder)
    assert 0 < len(left) < 1500  # stopped part-way
    finished = files(gen(root, n=1500, extra_steps=True))
    whole = files(gen(tmp_path / "whole", n=1500, extra_steps=True))
    assert finished == whole and all(finished[k] == v for k, v in left.items())


@pytest.mark.parametrize("trainer", ["rounds", "full_batch"])
def test_main_data_parallel_matches_one_process(tmp_path, trainer):
    """main.py under torchrun (2 ranks, each half of every batch, gradients all-reduced, decisions shared):
    the learned times equal a one-process run's to float rounding (rounds: measured 2.7e-5 relative;
    allowed 1e-3)."""
    import torch

    data = gen(tmp_path / "d", n=20)
    runs = {}
    for ranks in (1, 2):
        args = [str(ROOT / "main.py"), "--all_config", CFG, "--data_dir", str(data), "--num_train", "10",
                "--num_valid", "10", "--main_train_batch_size", "2", "--main_valid_batch_size", "5", "--steps", "4",
                "--visualize", "false", "--log_path", str(tmp_path / f"logs{ranks}"), "--trainer", trainer,
                "--fb_iters_v1", "10", "--fb_iters_v2", "10"]
        cmd = [sys.executable, *args] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[ranks] = next((tmp_path / f"logs{ranks}").glob("uni_pc-N4-*"))
    a, b = (torch.load(runs[k] / "best_v2.pt", weights_only=True)["best_t_steps"].double() for k in (1, 2))
    assert float(((a - b).abs() / a).max()) < 1e-3
    log = (runs[2] / "log.txt").read_text()
    assert log.count("training finished") == 1  # rank 0 alone writes
    import json

    traffic = json.loads((runs[2] / "result.json").read_text())["processes"]
    # at least the gradients of the 2 x 5 time parameters (float32) at every optimizer step
    assert traffic["world"] == 2 and traffic["all_reduce_bytes_per_step"] >= 2 * 5 * 4
    assert "processes" not in json.loads((runs[1] / "result.json").read_text())
