"""--match_prior / --gits_ts / --use_gits, --no_v1, and the prior fit of params1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gen_data
import main as ld3_main
from ld3.config import run_cli
from ld3.discretization import LearnedDiscretization
from ld3.samplers.discretizations import edm, from_edm_sigmas, time_quadratic
from ld3.samplers.gits import gits_sigmas
from ld3.samplers.schedules import VESchedule, VPDiscreteSchedule

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")
SIGMAS = "80.0,9.7,2.1,0.48,0.002"


@pytest.mark.parametrize("mode", ["lambda", "time"])
@pytest.mark.parametrize("schedule", [VESchedule(), VPDiscreteSchedule.linear(1000)], ids=["ve", "vp"])
def test_fit_to_reproduces_the_prior(mode, schedule):
    for steps in (4, 7):
        disc = LearnedDiscretization(schedule, steps, mode)
        target = edm(schedule, steps) if mode == "lambda" else time_quadratic(schedule, steps)
        disc.fit_to(target)
        t, tp = disc()
        assert torch.allclose(t, target, rtol=1e-9, atol=1e-12)
        assert torch.equal(t, tp)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("d")
    return Path(gen_data.main(["--all_config", CFG, "--total_samples", "20", "--sampling_batch_size", "20",
                               "--steps", "20", "--save_pt", "--data_dir", str(root)]))


def _train(tmp: Path, data: Path, *extra: str) -> Path:
    return Path(ld3_main.main(["--all_config", CFG, "--steps", "4", "--data_dir", str(data), "--num_train", "10", "--num_valid",
                               "10", "--log_path", str(tmp), "--visualize", "false", *extra]))


@pytest.mark.parametrize("trainer,zero,one", [
    ("rounds", ("--training_rounds_v1", "0", "--training_rounds_v2", "0"), ("--training_rounds_v1", "1", "--training_rounds_v2", "1")),
    ("full_batch", ("--fb_iters_v1", "0", "--fb_iters_v2", "0"), ("--fb_iters_v1", "5", "--fb_iters_v2", "5"))])
def test_match_prior_starts_from_the_given_sigmas(tmp_path, data, trainer, zero, one):
    run = _train(tmp_path, data, "--trainer", trainer, "--match_prior", "--gits_ts", SIGMAS, *zero)
    assert run.name.endswith("-match_prior")
    ck = torch.load(run / "best_v2.pt", weights_only=True)
    t = ck["best_t_steps"][:5]
    expected = from_edm_sigmas(VESchedule(), [float(s) for s in SIGMAS.split(",")])
    assert torch.allclose(t, expected, rtol=1e-8)
    # and learning moves on from there
    run = _train(tmp_path / "b", data, "--trainer", trainer, "--match_prior", "--gits_ts", SIGMAS, *one)
    t2 = torch.load(run / "best_v2.pt", weights_only=True)["best_t_steps"][:5]
    assert not torch.allclose(t2, expected, rtol=1e-3)


def test_no_v1_learns_only_params2(tmp_path, data):
    """As the paper's code: --no_v1 keeps every round (phase 1 too) and trains params2 alone in all of them."""
    run = _train(tmp_path, data, "--trainer", "rounds", "--no_v1", "--training_rounds_v2", "2")
    assert run.name.endswith("-no_v1_only_v2")
    ck = torch.load(run / "best_v2.pt", weights_only=True)
    assert torch.equal(ck["params1"], torch.ones_like(ck["params1"]))
    assert ck["params2"].abs().max() > 0
    v1 = torch.load(run / "best_v1.pt", weights_only=True)  # phase 1 ran, with params1 frozen
    assert torch.equal(v1["params1"], torch.ones_like(v1["params1"]))
    t, tp = ck["best_t_steps"][:5], ck["best_t_steps"][5:]
    assert torch.equal(t[[0, -1]], tp[[0, -1]]) and not torch.equal(t, tp)


def test_no_v1_full_batch_learns_only_params2(tmp_path, data):
    """--trainer full_batch with --no_v1: no phase 1 (no best_v1.pt); phase 2 moves params2 alone."""
    run = _train(tmp_path, data, "--no_v1", "--fb_iters_v2", "6")
    ck = torch.load(run / "best_v2.pt", weights_only=True)
    assert torch.equal(ck["params1"], torch.ones_like(ck["params1"]))
    assert ck["params2"].abs().max() > 0
    assert not (run / "best_v1.pt").exists()


def test_gen_data_with_gits_ts_samples_on_those_times(tmp_path):
    out = gen_data.main(["--all_config", CFG, "--total_samples", "3", "--steps", "4", "--gits_ts", SIGMAS,
                         "--skip_type", "gits", "--save_pt", "--data_dir", str(tmp_path)])
    assert Path(out).name == "uni_pc_NFE4_gits_seed0"


def test_use_gits_with_a_table_and_without_one(tmp_path, capsys):
    # the paper's CIFAR-10 table through --dataset; the digits have none: one clear line
    out = gen_data.main(["--all_config", CFG, "--total_samples", "2", "--steps", "6", "--solver_name", "ipndm",
                         "--use_gits", "--dataset", "cifar10", "--save_pt", "--data_dir", str(tmp_path / "a")])
    assert Path(out).name.startswith("ipndm_NFE6_")
    assert len(gits_sigmas("ipndm", 6, "cifar10")) == 7
    code = run_cli(gen_data.main, ["--all_config", CFG, "--total_samples", "2", "--steps", "6", "--use_gits",
                                   "--save_pt", "--data_dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "digits" in err and "cifar10" in err


def test_train_config_defaults_are_the_cli_s():
    """TrainConfig's defaults = the command line's, resolved at NFE 10 as main.py resolves them."""
    import dataclasses

    from ld3.config import OPTIONS
    from ld3.runtime import derived_hparams
    from ld3.trainer import TrainConfig, train_config_from

    cli = {k: o.default for k, o in OPTIONS.items()}
    bound, shift_lr, lr2 = derived_hparams(cli, (1, 8, 8), 10)
    resolved = train_config_from(cli, 0.0, shift_lr, lr2)  # bound: 0 in TrainConfig (latents fixed)
    for f in dataclasses.fields(TrainConfig):
        if f.name != "paper_average":
            assert getattr(resolved, f.name) == f.default, f.name
    assert bound > 0
