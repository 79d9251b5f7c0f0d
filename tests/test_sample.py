"""sample.py: samples (.npz layout, grid), metrics, and the comparison table on the digits mixture."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import gen_data
import main as ld3_main
import sample
from ld3.data import EVAL_STREAM, TRAIN_STREAM, noise_for_indices, to_uint8
from ld3.evaluate import grid_array
from ld3.models.registry import build_model
from ld3.samplers.discretizations import get_discretization
from ld3.samplers.solvers import solve

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")


def _sample(tmp: Path, name: str, *args: str) -> Path:
    return Path(sample.main(["--all_config", CFG, "--out_dir", str(tmp / name), "--teacher_distances", "L2,L1",
                             *args]))


def test_grid_layout():
    imgs = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 0.0, 1.0)])  # black, grey, white tiles
    g = grid_array(imgs, ncol=2, pad=1, min_tile=4)  # tiles enlarged 2x to 4 x 4
    assert g.shape == (1 + 2 * 5, 1 + 2 * 5, 1) and g.dtype == np.uint8
    assert (g[1:5, 1:5] == 0).all() and (g[1:5, 6:10] == 128).all() and (g[6:10, 1:5] == 255).all()
    assert (g[0] == 255).all() and (g[:, 5] == 255).all(), "white gaps between tiles"
    assert (g[6:10, 6:10] == 255).all(), "empty cell stays white"


def test_samples_npz_grid_and_metrics(tmp_path):
    out = _sample(tmp_path, "a", "--skip_type", "edm", "--steps", "4", "--num_samples", "23",
                  "--sampling_batch_size", "10", "--sampling_seed", "5")
    with np.load(out / "samples.npz") as f:
        assert f.files == ["arr_0"]
        arr = f["arr_0"]
    assert arr.shape == (23, 8, 8, 1) and arr.dtype == np.uint8, "N x H x W x C uint8 under arr_0"
    # the same images straight from the solver, from the evaluation stream of --sampling_seed
    model = build_model({"model": "digits_gmm", "schedule": "ve", "gmm_components": 40}, torch.device("cpu"))
    z = noise_for_indices(5, range(23), model.latent_shape, EVAL_STREAM)
    t = get_discretization("edm", model.schedule, 4)
    want = to_uint8(solve("uni_pc", model.noise_fn, model.schedule, model.schedule.prior(z), t, order=3).clamp(-1, 1))
    assert np.abs(arr.astype(int) - want.astype(int)).max() <= 1
    assert not torch.equal(z, noise_for_indices(5, range(23), model.latent_shape, TRAIN_STREAM))

    from PIL import Image

    grid = np.asarray(Image.open(out / "grid.png"))
    side = 5 * 33 + 1  # 23 samples: 5 x 5 tiles of 32 px (8 px enlarged 4x), below a title band
    assert grid.shape[0] > side and grid.shape[1] >= side
    tiles = grid[-side:, :side]
    assert (tiles[:, -1] == 255).all() and (tiles[0] == 255).all(), "white gaps around the tiles"
    assert np.array_equal(tiles[1:33, 1:33], np.kron(arr[0, ..., 0], np.ones((4, 4), np.uint8)))

    m = json.loads((out / "metrics.json").read_text())
    assert m["num_samples"] == 23 and m["nfe"] == 4 and m["discretization"] == "edm"
    assert m["teacher"]["samples"] == 23 and m["teacher"]["L2"] > 0 and m["teacher"]["L1"] > 0
    d = m["digits"]
    assert 0 <= d["confident_share"] <= 1 and sum(d["class_histogram"]) == pytest.approx(1, abs=1e-3)
    assert d["frechet"] > 0 and d["frechet_floor"] > 0

    # batch size does not change the samples; the teacher itself is at distance 0
    out2 = _sample(tmp_path, "b", "--skip_type", "edm", "--steps", "20", "--num_samples", "6",
                   "--sampling_batch_size", "4", "--sampling_seed", "5", "--metrics", "teacher")
    assert json.loads((out2 / "metrics.json").read_text())["teacher"]["L2"] == 0.0
    out3 = _sample(tmp_path, "c", "--skip_type", "edm", "--steps", "20", "--num_samples", "6",
                   "--sampling_batch_size", "6", "--sampling_seed", "5", "--metrics", "none")
    assert np.array_equal(np.load(out2 / "samples.npz")["arr_0"], np.load(out3 / "samples.npz")["arr_0"])
    assert not (out3 / "metrics.json").read_text().count('"teacher"')


def test_load_from_uses_t_and_t_prime(tmp_path):
    model = build_model({"model": "digits_gmm", "schedule": "ve", "gmm_components": 40}, torch.device("cpu"))
    t = torch.tensor([80.0, 5.0, 1.2, 0.3, 0.002], dtype=torch.float64)
    tp = torch.tensor([80.0, 4.5, 1.3, 0.31, 0.002], dtype=torch.float64)
    torch.save({"params1": torch.ones(5), "params2": torch.zeros(5), "best_t_steps": torch.cat([t, tp])},
               tmp_path / "best_v2.pt")
    out = _sample(tmp_path, "l", "--load_from", str(tmp_path / "best_v2.pt"), "--steps", "4", "--num_samples", "8",
                  "--metrics", "none")
    z = noise_for_indices(0, range(8), model.latent_shape, EVAL_STREAM)
    want = to_uint8(solve("uni_pc", model.noise_fn, model.schedule, model.schedule.prior(z), t, tp, order=3)
                    .clamp(-1, 1))
    assert np.abs(np.load(out / "samples.npz")["arr_0"].astype(int) - want.astype(int)).max() <= 1
    assert json.loads((out / "metrics.json").read_text())["t_prime"] == tp.tolist()


def test_user_errors_are_one_line(tmp_path, capsys):
    from ld3.config import run_cli

    for args, words in [(("--export", str(tmp_path / "nope")), "not found"),
                        (("--metrics", "fid", "--ref_path", str(tmp_path / "ref.npz")), "--ref_path"),
                        (("--metrics", "bogus",), "--metrics"),
                        (("--compare", "--nfes", "4,x"), "--nfes"),
                        (("--compare", "--metric", "digit_fd", "--model", "gaussian"), "8x8"),
                        (("--compare", "--runs", str(tmp_path)), "no best_v2.pt")]:
        capsys.readouterr()
        rc = run_cli(sample.main, ["--all_config", CFG, *args, "--out_dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("error:") and words in last, (args, err)
    assert not (tmp_path / "o").exists()


def test_comparison_table_learned_ahead_of_baselines(tmp_path):
    """Train one quick LD3 run (uni_pc, NFE 4) and compare it with every baseline at NFE 3 and 4."""
    data = gen_data.main(["--all_config", CFG, "--total_samples", "100", "--sampling_batch_size", "50",
                          "--steps", "20", "--solver_name", "uni_pc", "--skip_type", "edm", "--save_pt",
                          "--data_dir", str(tmp_path / "data")])
    run = ld3_main.main(["--all_config", CFG, "--data_dir", str(data), "--solver_name", "uni_pc", "--steps", "4",
                         "--num_train", "50", "--num_valid", "50", "--training_rounds_v1", "1",
                         "--training_rounds_v2", "2", "--log_path", str(tmp_path / "logs"), "--visualize", "false"])
    out = Path(sample.main(["--all_config", CFG, "--compare", "--runs", str(run), "--nfes", "3,4",
                            "--num_samples", "200", "--data_dir", str(data), "--out_dir", str(tmp_path / "cmp")]))
    rows = {r["discretization"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert set(rows) == {"time_uniform", "time_quadratic", "logSNR", "edm", "LD3"}
    assert rows["LD3"]["NFE 3"] == "", "a learned run fills only the NFE it was trained for"
    ld3 = float(rows["LD3"]["NFE 4"])
    for name in ("time_uniform", "time_quadratic", "logSNR", "edm"):
        assert ld3 < float(rows[name]["NFE 4"]), (name, rows)
        assert float(rows[name]["NFE 3"]) > 0
    md = (out / "comparison.md").read_text()
    assert md.startswith("| discretization | NFE 3 | NFE 4 |")
    assert f"| LD3 | - | **{ld3:.4g}** |" in md
    assert "Made with `python3 sample.py" in md
    assert (out / "comparison.png").stat().st_size > 1000


def test_fid_metric_through_the_cli(tmp_path, monkeypatch):
    """--metrics fid and --compare --metric fid, with a stand-in feature network (Inception is not shipped)."""
    import ld3.fid as fid_mod
    from ld3.metrics import frechet_distance
    from ld3.models.digit_classifier import load_digits_split
    from tests.test_fid import FakeInception

    net = FakeInception(64)
    monkeypatch.setattr(fid_mod, "load_inception", lambda device, weights=None: net)
    ref = to_uint8(load_digits_split()[0])
    np.savez(tmp_path / "ref.npz", arr_0=ref)  # images only: their statistics are computed

    out = _sample(tmp_path, "f", "--skip_type", "edm", "--steps", "4", "--num_samples", "40", "--metrics", "fid",
                  "--ref_path", str(tmp_path / "ref.npz"), "--save_png")
    arr = np.load(out / "samples.npz")["arr_0"]

    def feats(a):
        return net(torch.from_numpy(a).permute(0, 3, 1, 2).expand(-1, 3, -1, -1))[0].numpy()

    m = json.loads((out / "metrics.json").read_text())
    assert m["fid"] == pytest.approx(frechet_distance(feats(arr), feats(ref)), rel=1e-9)
    assert "teacher" not in m and "digits" not in m
    from PIL import Image

    assert len(list((out / "images").glob("*.png"))) == 40
    assert np.array_equal(np.asarray(Image.open(out / "images" / "000007.png")), arr[7, ..., 0])

    cmp_dir = Path(sample.main(["--all_config", CFG, "--compare", "--nfes", "2,4", "--metric", "fid",
                                "--ref_path", str(tmp_path / "ref.npz"), "--num_samples", "40",
                                "--out_dir", str(tmp_path / "cmp")]))
    rows = {r["discretization"]: r for r in csv.DictReader((cmp_dir / "comparison.csv").open())}
    assert float(rows["edm"]["NFE 4"]) == pytest.approx(m["fid"], rel=1e-9), "same noises in both commands"
    assert float(rows["time_uniform"]["NFE 2"]) > float(rows["edm"]["NFE 4"])
    assert "FID from 40 samples" in (cmp_dir / "comparison.md").read_text()


def test_plain_run_prints_its_metrics_titles_its_grid_and_warns_nothing(tmp_path):
    """sample.py for people: the metrics on stdout, a grid that says what it shows, and no library
    deprecation or future warnings on a plain run (they are errors here)."""
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "s"
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning",
                        str(ROOT / "sample.py"), "--all_config", str(ROOT / "configs" / "digits.yml"),
                        "--skip_type", "edm", "--steps", "4", "--num_samples", "9", "--sampling_batch_size", "9",
                        "--out_dir", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Warning" not in r.stderr, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert f"L2 {m['teacher']['L2']:.5g}" in r.stdout and "digits: Frechet" in r.stdout
    assert "LPIPS skipped" in r.stderr and "--teacher_distances" in r.stderr
    grid = np.asarray(Image.open(out / "grid.png"))
    arr = np.load(out / "samples.npz")["arr_0"]
    tiles = grid_array(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1, 3)[..., 0]
    assert grid.shape[0] > tiles.shape[0]  # a title band above the tiles, which are the samples
    assert (grid[-tiles.shape[0]:, :tiles.shape[1]] == tiles).all()
