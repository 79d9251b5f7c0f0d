"""A run killed (SIGKILL) at any moment resumes to exactly the result of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")


def start(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(script: str, *args: str) -> None:
    p = start(script, *args)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err


def kill_when(p: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """SIGKILL ``p`` as soon as ``ready()`` holds; False if it ended first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None:
            return False
        if ready():
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.01)
    p.kill()
    raise AssertionError("condition never met")


def gen_args(out: Path) -> list[str]:
    return ["--all_config", CFG, "--total_samples", "120", "--sampling_batch_size", "4", "--steps", "40",
            "--save_pt", "--save_png", "--data_dir", str(out)]


def test_gen_data_killed_then_rerun_equals_uninterrupted(tmp_path):
    finish("gen_data.py", *gen_args(tmp_path / "ref"))
    ref = tmp_path / "ref" / "uni_pc_NFE40_edm_seed0"
    out = tmp_path / "cut"
    folder = out / "uni_pc_NFE40_edm_seed0"
    for k in (10, 50):
        p = start("gen_data.py", *gen_args(out))
        killed = kill_when(p, lambda: folder.is_dir() and len(list(folder.glob("latent_*.pt"))) >= k)
        assert killed, "run ended before it could be killed; make it longer"
    assert len(list(folder.glob("latent_*.pt"))) < 120
    finish("gen_data.py", *gen_args(out))
    a, b = sorted(ref.glob("latent_*.pt")), sorted(folder.glob("latent_*.pt"))
    assert [x.name for x in a] == [x.name for x in b] and len(a) == 120
    assert not list(folder.glob(".*tmp")), "temporary files left behind"
    for x, y in zip(a, b):
        dx, dy = torch.load(x, weights_only=True), torch.load(y, weights_only=True)
        assert torch.equal(dx["latent"], dy["latent"]) and torch.equal(dx["img"], dy["img"])
    for x in sorted(ref.glob("*.png")):
        assert x.read_bytes() == (folder / x.name).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("trainer,key,first,second", [("rounds", "round", 1, 3), ("full_batch", "it", 20, 50)])
def test_main_killed_then_resumed_equals_uninterrupted(tmp_path, trainer, key, first, second):
    finish("gen_data.py", "--all_config", CFG, "--total_samples", "40", "--sampling_batch_size", "40",
           "--steps", "20", "--save_pt", "--data_dir", str(tmp_path / "data"))
    data = tmp_path / "data" / "uni_pc_NFE20_edm_seed0"
    args = ["--all_config", CFG, "--data_dir", str(data), "--num_train", "20", "--num_valid", "20",
            "--training_rounds_v1", "2", "--training_rounds_v2", "3", "--visualize", "false", "--trainer", trainer]
    finish("main.py", *args, "--log_path", str(tmp_path / "ref"))
    ref = next((tmp_path / "ref").iterdir())

    logs = tmp_path / "cut"
    state = lambda: next(logs.iterdir()) / "last_state.pt" if logs.is_dir() and any(logs.iterdir()) else None  # noqa
    seen: list[int] = []

    def after_rounds(n: int):
        def ready() -> bool:
            s = state()
            if s is None or not s.is_file():
                return False
            try:
                r = torch.load(s, weights_only=True)[key]
            except Exception:  # noqa: BLE001 - file being replaced right now
                return False
            if r >= n:
                seen.append(r)
                return True
            return False
        return ready

    p = start("main.py", *args, "--log_path", str(logs))
    assert kill_when(p, after_rounds(first))
    p = start("main.py", *args, "--log_path", str(logs), "--resume")
    assert kill_when(p, after_rounds(second))
    finish("main.py", *args, "--log_path", str(logs), "--resume")
    run = next(logs.iterdir())
    assert run.name == ref.name
    a = torch.load(ref / "best_v2.pt", weights_only=True)
    b = torch.load(run / "best_v2.pt", weights_only=True)
    for k in ("params1", "params2", "best_t_steps"):
        assert torch.equal(a[k], b[k]), k
    a1 = torch.load(ref / "best_v1.pt", weights_only=True)
    b1 = torch.load(run / "best_v1.pt", weights_only=True)
    assert torch.equal(a1["best_t_steps"], b1["best_t_steps"])


def test_killed_gen_data_leaves_no_process_behind(tmp_path):
    p = start("gen_data.py", *gen_args(tmp_path / "x"))
    folder = tmp_path / "x" / "uni_pc_NFE40_edm_seed0"
    assert kill_when(p, lambda: folder.is_dir() and len(list(folder.glob("latent_*.pt"))) >= 8)
    time.sleep(1.0)
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert not [line for line in out.splitlines() if str(tmp_path / "x") in line], out
