"""The full-batch trainer (``--trainer full_batch``, ours): exact gradients, determinism, phases, selection,
resume, and that it learns; the paper's rounds stay one switch away (``--trainer rounds``, ``--paper_compat``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import gen_data
import main as ld3_main
from ld3.config import parse_config
from ld3.data import SampleSet, load_samples
from ld3.discretization import LearnedDiscretization
from ld3.full_batch import FullBatchConfig, FullBatchTrainer, cosine_rate, robust_terms
from ld3.losses import make_distance
from ld3.runtime import setup_device_and_model
from ld3.student import Rollout, SolverSpec
from ld3.trainer import NumericalError
from tests.test_errors import check

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return Path(gen_data.main(["--all_config", CFG, "--total_samples", "24", "--sampling_batch_size", "24",
                               "--steps", "10", "--save_pt", "--data_dir", str(tmp_path_factory.mktemp("data"))]))


@pytest.fixture(scope="module")
def parts(data):
    """(model, rollout, distance, samples) of the digits mixture, uni_pc NFE 4."""
    cfg = parse_config(["--all_config", CFG, "--solver_name", "uni_pc", "--steps", "4"], script="main")
    _, model = setup_device_and_model(cfg)
    samples = load_samples(data, 24, model.latent_shape, model.latent_shape)
    return model, Rollout(model, SolverSpec.from_cfg(cfg)), make_distance("L2", torch.device("cpu")), samples


def trainer(parts, cfg: FullBatchConfig, valid: SampleSet | None = None, **kw) -> FullBatchTrainer:
    model, rollout, distance, samples = parts
    train = samples.subset(slice(0, 16)) if valid is not None else samples
    disc = LearnedDiscretization(model.schedule, 4)
    return FullBatchTrainer(disc, rollout, distance, train, valid if valid is not None else train, cfg,
                            count_calls=lambda: rollout.fn.calls, **kw)


def direct_distances(parts, disc, sset: SampleSet) -> torch.Tensor:
    """The per-sample distances over ``sset`` in one batch, by autograd."""
    model, rollout, distance, _ = parts
    t, tp = disc()
    return distance(rollout(sset.latent, rollout.grid(t, tp)).float(), sset.img.float())


def direct_loss(parts, disc, sset: SampleSet, c: float | None = None) -> torch.Tensor:
    """The objective over ``sset`` in one batch, written out (the mean of 2c(sqrt(1 + d/c) - 1), or of d without
    c): what the trainer's chunks must add up to."""
    d = direct_distances(parts, disc, sset)
    return d.mean() if c is None else (2 * c * (torch.sqrt(1 + d / c) - 1)).mean()


def test_full_batch_config_defaults_are_the_cli_s():
    from ld3.config import OPTIONS

    d = FullBatchConfig()
    assert (d.iters_v1, d.iters_v2, d.lr_1, d.lr_2, d.robust) == tuple(
        OPTIONS[k].default for k in ("fb_iters_v1", "fb_iters_v2", "fb_lr_1", "fb_lr_2", "fb_robust"))
    assert d.valid_every == OPTIONS["valid_every"].default


def test_chunk_defaults_to_the_training_batch(data):
    """Without --fb_chunk the chunk is main_train_batch_size (the paper's configs: 1-2, what their memory was
    sized for); the embedded configs set 50."""
    from ld3.cli.main import fb_chunk

    bare = parse_config(["--all_config", str(ROOT / "configs" / "cifar10.yml")], script="main")
    assert bare.get("fb_chunk") is None and fb_chunk(bare) == 2
    assert fb_chunk(parse_config(["--all_config", CFG, "--main_train_batch_size", "3"], script="main")) == 50
    assert fb_chunk(parse_config(["--all_config", CFG, "--fb_chunk", "7"], script="main")) == 7


def test_cosine_rate():
    assert cosine_rate(0.1, 0, 40) == 0.1
    assert cosine_rate(0.1, 20, 40) == pytest.approx(0.05)
    assert cosine_rate(0.1, 40, 40) == pytest.approx(0.0, abs=1e-15)
    assert all(cosine_rate(1.0, k, 10) > cosine_rate(1.0, k + 1, 10) for k in range(10))


def test_robust_terms():
    """d where d << c, 2 sqrt(c d) where d >> c, increasing, with slope 1/sqrt(1 + d/c) (<= 1); d without c."""
    d = torch.tensor([0.0, 1e-6, 1.0, 1e6], dtype=torch.float64)
    r = robust_terms(d, 1.0)
    assert r[0] == 0 and r[1] == pytest.approx(1e-6, rel=1e-6)
    assert r[3] == pytest.approx(2 * 1e3, rel=1e-3) and r[2] == pytest.approx(2 * (math.sqrt(2) - 1))
    x = d.clone().requires_grad_(True)
    robust_terms(x, 0.5).sum().backward()
    assert torch.allclose(x.grad, 1 / torch.sqrt(1 + d / 0.5))
    assert torch.equal(robust_terms(d, None), d)


def test_scale_is_fixed_at_the_start_from_the_median(parts):
    """c = robust x the median starting distance, computed in the first iteration and kept (and in the resume
    state); robust 0 gives the plain mean."""
    tr = trainer(parts, FullBatchConfig(iters_v1=2, iters_v2=1, chunk=7, robust=3.0))
    with torch.no_grad():
        start = direct_distances(parts, tr.disc, tr.train).double()
    assert tr.fix_scale() == pytest.approx(3.0 * float(start.median()), rel=1e-6)
    tr.run()
    assert tr.state.scale == pytest.approx(3.0 * float(start.median()), rel=1e-6)
    assert tr.state_dict()["scale"] == tr.state.scale
    assert tr.state.history[0]["train_loss"] == pytest.approx(float(robust_terms(start, tr.state.scale).mean()),
                                                              rel=1e-6)
    plain = trainer(parts, FullBatchConfig(iters_v1=1, iters_v2=0, robust=0.0))
    plain.run()
    assert plain.state.scale is None
    assert plain.state.history[0]["train_loss"] == pytest.approx(float(start.mean()), rel=1e-6)


@pytest.mark.parametrize("c", [None, 0.1])
def test_chunked_gradient_is_the_whole_sets_gradient(parts, c):
    """Chunks of 5 (the last one short) give the loss and gradient of all 24 samples at once (plain and robust
    objective)."""
    tr = trainer(parts, FullBatchConfig(chunk=5))
    tr.state.scale = c
    with torch.no_grad():  # away from the symmetric start, t' != t
        tr.disc.params1.copy_(torch.linspace(0.5, 1.5, 5, dtype=torch.float64))
        tr.disc.params2.copy_(torch.tensor([0.0, 0.2, -0.1, 0.15, 0.0], dtype=torch.float64))
    tr.disc.params2.requires_grad_(True)
    loss = tr.loss_and_grad()
    g1, g2 = tr.disc.params1.grad.clone(), tr.disc.params2.grad.clone()
    tr.disc.params1.grad = tr.disc.params2.grad = None
    ref = direct_loss(parts, tr.disc, tr.train, c)
    if c is not None:  # the robust objective is not the plain mean here: some distances are above c, some below
        d = direct_distances(parts, tr.disc, tr.train).detach()
        assert (d > c).any() and (d < c).any() and float(ref) < float(d.mean()) * 0.99
    ref.backward()
    assert loss == pytest.approx(float(ref), rel=1e-6)
    assert torch.allclose(g1, tr.disc.params1.grad, rtol=1e-4, atol=1e-8)
    assert torch.allclose(g2, tr.disc.params2.grad, rtol=1e-4, atol=1e-8)
    assert g2[1:-1].abs().min() > 0  # t' is learned: the inner params2 have a gradient


@pytest.mark.parametrize("c", [None, 0.1])
def test_gradient_matches_finite_differences(parts, c):
    tr = trainer(parts, FullBatchConfig(chunk=24))
    tr.state.scale = c
    with torch.no_grad():
        tr.disc.params1.copy_(torch.tensor([1.0, 0.7, 1.2, 0.9, 1.1], dtype=torch.float64))
    tr.disc.params2.requires_grad_(True)
    tr.loss_and_grad()
    g = tr.disc.params1.grad.clone()
    eps = 1e-3
    for i in range(1, 5):  # params1[0] cancels in the map
        with torch.no_grad():
            tr.disc.params1[i] += eps
            up = tr.evaluate(tr.train)
            tr.disc.params1[i] -= 2 * eps
            down = tr.evaluate(tr.train)
            tr.disc.params1[i] += eps
        assert g[i].item() == pytest.approx((up - down) / (2 * eps), rel=2e-3, abs=1e-7), i


def test_phases_selection_and_call_counts(parts):
    """Phase 1 moves params1 only, phase 2 both; the best checkpoint is the lowest loss seen; each
    iteration rolls every sample out once forward and backward (NFE calls per sample)."""
    cfg = FullBatchConfig(iters_v1=6, iters_v2=6, lr_1=0.1, lr_2=0.05, chunk=10)
    tr = trainer(parts, cfg)
    res = tr.run()
    h = tr.state.history
    assert [r["phase"] for r in h] == [1] * 6 + [2] * 6
    assert all(r["lr2"] == 0.0 for r in h[:6]) and all(r["lr2"] > 0 for r in h[6:])
    assert h[0]["lr1"] == 0.1 and h[6]["lr1"] == 0.05
    assert tr.state.best_v1 is not None and res.best_v1_loss >= res.best_loss
    seen = [r["valid_loss"] for r in h]
    assert res.best_loss == min(seen)
    assert res.best_loss < h[0]["train_loss"] * 0.8  # it learns
    # 12 iterations x 4 calls x 24 samples, and the starting distances once (the robust scale); then one
    # evaluation (4 calls) at the end of each phase
    assert res.nfe["train"] == (12 + 1) * 4 * 24
    assert res.nfe["validation"] == 2 * 4 * 24
    # the best parameters are loaded and give the best loss
    assert tr.evaluate(tr.train) == pytest.approx(res.best_loss, rel=1e-6)


def test_separate_validation_set_chooses(parts):
    """--valid_use select: learn on 16 samples, choose on the other 8 (every valid_every iterations)."""
    _, _, _, samples = parts
    valid = samples.subset(slice(16, 24))
    tr = trainer(parts, FullBatchConfig(iters_v1=4, iters_v2=4, chunk=8, valid_every=2), valid=valid)
    res = tr.run()
    vals = [r["valid_loss"] for r in tr.state.history if "valid_loss" in r]
    assert len(vals) == 4  # iterations 2 and 4 of each phase (4: the phase's end)
    assert res.best_loss <= min(vals)
    assert tr.evaluate() == pytest.approx(res.best_loss, rel=1e-6)


def test_resume_equals_an_uninterrupted_run(parts):
    cfg = FullBatchConfig(iters_v1=5, iters_v2=5, chunk=24, save_every=3)
    whole = trainer(parts, cfg)
    whole.run()

    class Stop(Exception):
        pass

    saved = {}

    def save(tr):
        saved["state"] = tr.state_dict()
        if tr.state.it >= 6:  # stopped inside phase 2, after a save
            raise Stop

    first = trainer(parts, cfg)
    with pytest.raises(Stop):
        first.run(save)
    again = trainer(parts, cfg)
    again.load_state_dict(torch.load(_roundtrip(saved["state"]), weights_only=False))
    again.run()
    assert torch.equal(again.disc.params1, whole.disc.params1)
    assert torch.equal(again.disc.params2, whole.disc.params2)
    assert again.state.history == whole.state.history


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_non_finite_loss_stops_with_a_message(parts):
    model, rollout, distance, samples = parts
    tr = trainer(parts, FullBatchConfig(iters_v1=3, iters_v2=0))
    tr.distance = lambda a, b: torch.full((a.shape[0],), math.nan, requires_grad=True)
    with pytest.raises(NumericalError, match="NaN"):
        tr.run()


# ------------------------------------------------------------------ through main.py


def args(data: Path, logs: Path, *extra: str) -> list[str]:
    return ["--all_config", CFG, "--data_dir", str(data), "--solver_name", "ipndm", "--steps", "4",
            "--num_train", "12", "--num_valid", "12", "--main_valid_batch_size", "12", "--fb_iters_v1", "8",
            "--fb_iters_v2", "8", "--visualize", "false", "--log_path", str(logs), *extra]


def test_main_is_deterministic_and_the_seed_changes_nothing(data, tmp_path):
    a = Path(ld3_main.main(args(data, tmp_path / "a", "--seed", "0")))
    b = Path(ld3_main.main(args(data, tmp_path / "b", "--seed", "3")))
    ca, cb = (torch.load(d / "best_v2.pt", weights_only=False) for d in (a, b))
    assert torch.equal(ca["best_t_steps"], cb["best_t_steps"])
    assert torch.equal(ca["params2"], cb["params2"])
    res = json.loads((a / "result.json").read_text())
    assert res["optimizer_steps"] == 16 and res["samples"]["learned_from"] == 24
    assert (a / "best_v1.pt").is_file()
    cfg = __import__("yaml").safe_load((a / "config.yml").read_text())
    assert cfg["trainer"] == "full_batch"


def test_paper_compat_and_rounds_use_the_paper_loop(data, tmp_path):
    cfg = parse_config(args(data, tmp_path, "--paper_compat"), script="main")
    assert cfg["trainer"] == "rounds"
    run = Path(ld3_main.main(args(data, tmp_path, "--trainer", "rounds", "--main_train_batch_size", "2",
                                  "--training_rounds_v1", "1", "--training_rounds_v2", "1")))
    res = json.loads((run / "result.json").read_text())
    assert res["optimizer_steps"] == 2 * 12  # 24 samples in batches of 2, one round per phase
    assert res["nfe_per_sample"]["latent_moves"] > 0


def test_a_rounds_run_is_not_reused_by_full_batch(data, tmp_path, capsys):
    ld3_main.main(args(data, tmp_path, "--trainer", "rounds", "--main_train_batch_size", "4",
                       "--training_rounds_v1", "1", "--training_rounds_v2", "0"))
    check(capsys, ld3_main.main, args(data, tmp_path, "--main_train_batch_size", "4", "--training_rounds_v1", "1",
                                      "--training_rounds_v2", "0"), "trainer", root=tmp_path)


def test_a_plain_mean_run_is_not_reused_by_the_robust_default(data, tmp_path, capsys):
    """fb_robust is in the run's identity; a record written before it existed counts as the plain mean (0)."""
    from ld3.identity import differences

    ld3_main.main(args(data, tmp_path, "--fb_robust", "0"))
    check(capsys, ld3_main.main, args(data, tmp_path), "fb_robust", root=tmp_path)
    assert differences({"trainer": "full_batch"}, {"trainer": "full_batch", "fb_robust": 2.0}) == [
        ("fb_robust", 0.0, 2.0)]
    assert differences({"trainer": "full_batch"}, {"trainer": "full_batch", "fb_robust": 0.0}) == []


def test_bad_full_batch_values(data, tmp_path, capsys):
    check(capsys, ld3_main.main, args(data, tmp_path, "--fb_lr_1", "0"), "--fb_lr_1")
    check(capsys, ld3_main.main, args(data, tmp_path, "--fb_iters_v1", "-1"), "--fb_iters_v1")
    check(capsys, ld3_main.main, args(data, tmp_path, "--fb_robust", "-1"), "--fb_robust")
    check(capsys, ld3_main.main, args(data, tmp_path, "--fb_iters_v1", "0", "--fb_iters_v2", "0"), "nothing would be learned")
    assert not any(tmp_path.rglob("*.pt"))


def test_l2root_is_the_root_of_l2():
    from ld3.losses import l2_distance, make_distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g)
    d = make_distance("L2root", torch.device("cpu"))(a, b)
    assert torch.allclose(d, l2_distance(a, b).sqrt())
    assert torch.isfinite(torch.autograd.functional.jacobian(lambda x: make_distance("L2root", "cpu")(x, x.detach()).sum(),
                                                             a)).all()  # finite gradient where student = teacher
