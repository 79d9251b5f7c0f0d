"""gen_data.py -> main.py end to end on the analytic digits mixture (no network weights needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gen_data
import main as ld3_main
from ld3.data import load_samples
from ld3.discretization import load_learned_times
from ld3.evaluate import compare_with_baselines
from ld3.losses import l2_distance
from ld3.models.registry import build_model
from ld3.samplers.solvers import solve

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=900)


def gen(tmp: Path, *extra: str, n: int = 20, bs: int = 10) -> Path:
    out = gen_data.main(["--all_config", CFG, "--total_samples", str(n), "--sampling_batch_size", str(bs),
                         "--steps", "20", "--solver_name", "uni_pc", "--skip_type", "edm", "--save_pt",
                         "--data_dir", str(tmp), *extra])
    return Path(out)


def readme_paper_commands() -> tuple[list[list[str]], str]:
    """README's three paper commands (split into argv) and the embedded run folder it names."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- paper-commands -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = [shlex.split(c) for c in re.sub(r"\\\n", " ", block).splitlines() if c.strip() and not c.startswith("#")]
    run = text.split("<!-- embedded-run -->`", 1)[1].split("`", 1)[0]
    return cmds, run


def test_paper_commands_verbatim(tmp_path):
    """README's commands of the paper, with only --all_config changed (and the run folder README names
    for the embedded models), on the digits mixture, on CPU."""
    cmds, embedded_run = readme_paper_commands()
    assert len(cmds) == 3
    results = []
    for argv in cmds:
        env = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
        argv = [a for a in argv if not ("=" in a and not a.startswith("-"))]
        assert argv[0] == "python3"
        argv = [CFG if a == "configs/cifar10.yml" else a for a in argv[1:]]
        argv = [a.replace("uni_pc-N10-b0.03072-LPIPS-lr20.01rv12-rv25-seed0", embedded_run) for a in argv]
        e = dict(os.environ, **env)
        results.append(subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=tmp_path, env=e,
                                      capture_output=True, text=True, timeout=900))
        assert results[-1].returncode == 0, results[-1].stderr
    data = tmp_path / "train_data/train_data_cifar10/uni_pc_NFE20_edm_seed0"
    assert len(list(data.glob("latent_*.pt"))) == 100 and len(list(data.glob("*.png"))) == 100
    d = torch.load(data / "latent_000007.pt", weights_only=True)
    assert set(d) == {"latent", "img", "c", "uc"} and d["latent"].shape == (1, 8, 8) and d["img"].shape == (1, 8, 8)
    assert d["img"].abs().max() > 1.0  # the teacher's images as computed, not clamped (the paper's files)

    run_dir = tmp_path / "logs/logs_cifar10" / embedded_run
    for f in ("config.yml", "log.txt", "best_v1.pt", "best_v2.pt", "schedule.png", "curves.png"):
        assert (run_dir / f).is_file(), f
    ck = torch.load(run_dir / "best_v2.pt", weights_only=True)
    assert set(ck) >= {"params1", "params2", "best_t_steps"} and ck["best_t_steps"].numel() == 2 * 11
    import json

    hist = json.loads((run_dir / "history.json").read_text())
    assert min(h["best_valid"] for h in hist if "best_valid" in h) < 0.5 * hist[0]["valid_loss"], "did not learn"
    samples = tmp_path / "samples/cifar10/uni_pc_NFE10_ld3_seed0"
    assert len(list(samples.glob("*.png"))) == 1000, sorted(p.name for p in samples.parent.iterdir())

    # skip-if-finished: the same command again returns at once and leaves the checkpoint untouched
    mtime = (run_dir / "best_v2.pt").stat().st_mtime_ns
    argv = [CFG if a == "configs/cifar10.yml" else a for a in cmds[1][3:]]
    r = subprocess.run([sys.executable, str(ROOT / "main.py"), *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0 and "already records a finished training" in r.stderr
    assert (run_dir / "best_v2.pt").stat().st_mtime_ns == mtime


def test_noise_independent_of_batch_size_and_last_partial_batch(tmp_path):
    a = gen(tmp_path / "a", n=23, bs=10)
    b = gen(tmp_path / "b", n=23, bs=4)
    fa, fb = sorted(a.glob("latent_*.pt")), sorted(b.glob("latent_*.pt"))
    assert len(fa) == len(fb) == 23
    for x, y in zip(fa, fb):
        dx, dy = torch.load(x, weights_only=True), torch.load(y, weights_only=True)
        assert torch.equal(dx["latent"], dy["latent"])
        assert torch.allclose(dx["img"], dy["img"], atol=1e-6)


def _train(tmp: Path, data: Path, log: str, *extra: str) -> Path:
    return Path(ld3_main.main(["--all_config", CFG, "--steps", "4", "--data_dir", str(data), "--num_train", "10", "--num_valid", "10",
                               "--main_valid_batch_size", "10", "--training_rounds_v1", "1", "--training_rounds_v2",
                               "1", "--log_path", str(tmp / log), "--visualize", "false", *extra]))


def test_same_seed_same_checkpoint(tmp_path):
    data = gen(tmp_path / "d", n=20)
    r1 = _train(tmp_path, data, "l1")
    r2 = _train(tmp_path, data, "l2")
    a = torch.load(r1 / "best_v2.pt", weights_only=True)
    b = torch.load(r2 / "best_v2.pt", weights_only=True)
    for k in ("params1", "params2", "best_t_steps"):
        assert torch.equal(a[k], b[k])


def test_load_from_paper_checkpoint(tmp_path):
    """A checkpoint in the paper's format drives gen_data.py --load_from and the library function."""
    model = build_model({"model": "digits_gmm", "schedule": "ve", "gmm_components": 40}, torch.device("cpu"))
    t = torch.tensor([80.0, 5.0, 1.2, 0.3, 0.002], dtype=torch.float64)
    tp = torch.tensor([80.0, 4.5, 1.3, 0.31, 0.002], dtype=torch.float64)
    ck = {"params1": torch.ones(5), "params2": torch.zeros(5), "best_t_steps": torch.cat([t, tp])}
    path = tmp_path / "best_v2.pt"
    torch.save(ck, path)
    t2, tp2 = load_learned_times(path)
    assert torch.equal(t2, t) and torch.equal(tp2, tp)
    out = gen(tmp_path / "g", "--load_from", str(path), "--steps", "4", n=5)
    assert out.name == "uni_pc_NFE4_ld3_seed0"
    s = load_samples(out, 5)
    x = solve("uni_pc", model.noise_fn, model.schedule, model.schedule.prior(s.latent.double()), t, tp)
    assert torch.allclose(s.img.double(), x, atol=1e-5)


def test_lpips_without_weights_is_one_line(tmp_path):
    data = gen(tmp_path / "d", n=4)
    r = run("main.py", "--all_config", CFG, "--data_dir", str(data), "--num_train", "2", "--num_valid", "2",
            "--loss_type", "LPIPS", "--log_path", str(tmp_path / "logs"),
            env={"TORCH_HOME": str(tmp_path / "empty_hub"), "HF_HUB_OFFLINE": "1"})
    if r.returncode == 0:
        pytest.skip("LPIPS weights are available on this machine")
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert "vgg16-397923af.pth" in err and "--loss_type L2" in err and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["uni_pc", "ipndm"])
@pytest.mark.parametrize("nfe", [4, 6])
def test_learned_beats_every_baseline(tmp_path, solver, nfe):
    """100 teacher samples (uni_pc, 20 NFE); LD3 vs every baseline on 200 fresh noises."""
    data = gen(tmp_path / "d", n=100, bs=50)
    run_dir = Path(ld3_main.main(["--all_config", CFG, "--data_dir", str(data), "--solver_name", solver,
                                  "--steps", str(nfe), "--num_train", "50", "--num_valid", "50",
                                  "--log_path", str(tmp_path / "logs"), "--visualize", "false"]))
    t, tp = load_learned_times(run_dir / "best_v2.pt")
    cfg = {**ld3_main.parse_config(["--all_config", CFG, "--solver_name", solver, "--steps", str(nfe)]),
           "data_dir": str(data), "visualize": False}
    model = build_model(cfg, torch.device("cpu"))
    rows = compare_with_baselines(cfg, model, torch.device("cpu"), {"LD3": (t, tp)}, 200, l2_distance)
    for name in ("time_uniform", "time_quadratic", "logSNR", "edm"):
        assert rows["LD3"] < rows[name], (name, rows)


def test_load_from_run_folder_uses_its_nfe_and_warns(tmp_path, caplog):
    data = gen(tmp_path / "d", n=20)
    run = _train(tmp_path, data, "l")
    with caplog.at_level("WARNING"):
        out = gen(tmp_path / "g", "--load_from", str(run), "--steps", "10", "--solver_name", "ipndm", n=3)
    assert out.name == "ipndm_NFE4_ld3_seed0"  # the run's 4 steps, not --steps 10
    msgs = " ".join(r.message for r in caplog.records)
    assert "--steps 10 is ignored" in msgs and "solver_name=uni_pc" in msgs


def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    """README's "In Python" block, verbatim, in a working directory holding the run folder it names."""
    from ld3.discretization import LearnedDiscretization, checkpoint_dict
    from ld3.samplers.schedules import VESchedule

    text = (ROOT / "README.md").read_text()
    code = text.split("In Python:", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    ck_path = code.split('load_learned_times("', 1)[1].split('"', 1)[0]
    disc = LearnedDiscretization(VESchedule(), 4, "lambda", 0.5)
    monkeypatch.chdir(tmp_path)
    Path(ck_path).parent.mkdir(parents=True)
    torch.save(checkpoint_dict(disc), ck_path)
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)
    assert env["images"].shape == (16, 1, 8, 8) and torch.isfinite(env["images"]).all()
