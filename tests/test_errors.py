"""Mistakes a user can make: one line naming the problem and the fix, exit status 2, nothing written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import gen_data
import main as ld3_main
from ld3.config import run_cli
from ld3.models import registry
from ld3.models.analytic import digits_gmm_model

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return Path(gen_data.main(["--all_config", CFG, "--total_samples", "6", "--sampling_batch_size", "6",
                               "--steps", "20", "--save_pt", "--data_dir", str(root)]))


def check(capsys, fn, argv, *needles, root: Path | None = None):
    before = snapshot(root) if root else None
    code = run_cli(fn, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    line = [x for x in err if x.startswith("error:")]
    assert len(line) == 1, err
    for n in needles:
        assert n.lower() in line[0].lower(), (n, line[0])
    assert "Traceback" not in "\n".join(err)
    if root:
        assert snapshot(root) == before, "files changed"


def train_args(data: Path, logs: Path, *extra: str) -> list[str]:
    return ["--all_config", CFG, "--data_dir", str(data), "--num_train", "3", "--num_valid", "3",
            "--log_path", str(logs), "--training_rounds_v1", "1", "--training_rounds_v2", "1", *extra]


GEN_BAD = [
    (["--all_config", "nope.yml"], ["nope.yml", "not found"]),
    (["--all_config", CFG, "--solver_name", "rk45"], ["rk45", "uni_pc"]),
    (["--all_config", CFG, "--skip_type", "cosine"], ["cosine", "logSNR"]),
    (["--all_config", CFG, "--model", "gpt"], ["gpt", "digits_gmm"]),
    (["--all_config", CFG, "--time_mode", "sigma"], ["time_mode", "sigma"]),
    (["--all_config", CFG, "--order", "5", "--solver_name", "uni_pc"], ["order 5", "uni_pc"]),
    (["--all_config", CFG, "--steps", "0"], ["--steps 0", ">= 1"]),
    (["--all_config", CFG, "--steps", "2", "--solver_name", "dpm_solver", "--order", "3"], ["dpm_solver", "at least 3"]),
    (["--all_config", CFG, "--total_samples", "0"], ["total_samples", ">= 1"]),
    (["--all_config", CFG, "--sampling_batch_size", "-1"], ["sampling_batch_size", ">= 1"]),
    (["--all_config", CFG, "--device", "cuda:7"], ["cuda"]),
    (["--all_config", CFG, "--device", "tpu"], ["tpu"]),
    (["--all_config", CFG, "--steps", "four"], ["steps", "four"]),
]


@pytest.mark.parametrize("argv,needles", GEN_BAD, ids=[" ".join(a[2:4]) or a[1] for a, _ in GEN_BAD])
def test_gen_data_bad_input(tmp_path, capsys, argv, needles):
    check(capsys, gen_data.main, argv + ["--data_dir", str(tmp_path / "out"), "--save_pt"], *needles, root=tmp_path)
    assert not (tmp_path / "out").exists()


def test_unreadable_and_broken_config(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("steps: [1, 2\n")
    check(capsys, gen_data.main, ["--all_config", str(bad)], "bad.yml", "yml", root=tmp_path)
    bad.write_text("- just\n- a list\n")
    check(capsys, gen_data.main, ["--all_config", str(bad)], "mapping", root=tmp_path)
    check(capsys, gen_data.main, ["--data_dir", str(tmp_path)], "--all_config", root=tmp_path)


def test_unknown_flag_suggests_nearest(tmp_path, capsys):
    check(capsys, gen_data.main, ["--all_config", CFG, "--sampling_batchsize", "3"], "--sampling_batchsize",
          "--sampling_batch_size", root=tmp_path)


def test_unknown_yml_key_warns_with_nearest(tmp_path, caplog):
    cfg = tmp_path / "c.yml"
    cfg.write_text(Path(CFG).read_text() + "lr_tme_1: 0.1\n")
    from ld3.config import parse_config

    with caplog.at_level("WARNING"):
        parse_config(["--all_config", str(cfg)])
    assert any("lr_tme_1" in r.message and "lr_time_1" in r.message for r in caplog.records)


def test_main_bad_input(tmp_path, capsys, data):
    logs = tmp_path / "logs"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (train_args(tmp_path / "missing", logs), ["missing", "gen_data.py"]),
        (train_args(empty, logs), ["no latent_*.pt"]),
        (train_args(data, logs, "--num_train", "5"), ["has 6 samples", "8 are needed"]),
        (train_args(data, logs, "--loss_type", "L3"), ["loss_type", "L3"]),
        (train_args(data, logs, "--main_train_batch_size", "0"), ["main_train_batch_size", ">= 1"]),
        (train_args(data, logs, "--num_valid", "0"), ["num_valid", ">= 1"]),
        (train_args(data, logs, "--resume"), ["--resume", "no saved state"]),
        (train_args(data, logs, "--schedule", "vp_cosine"), ["schedule", "vp_cosine"]),
    ]
    for argv, needles in cases:
        check(capsys, ld3_main.main, argv, *needles, root=tmp_path)
    assert not logs.exists() or not any(logs.rglob("*.pt"))


def test_gap_in_sample_indices(tmp_path, capsys, data):
    """The train/valid split is by file index (the paper's): a missing file is an error, not a shifted split."""
    import shutil

    bad = tmp_path / "gap"
    shutil.copytree(data, bad)
    (bad / "latent_000002.pt").unlink()
    check(capsys, ld3_main.main, train_args(bad, tmp_path / "logs", "--num_train", "2", "--num_valid", "2"),
          "latent_000002.pt is missing", root=tmp_path)


def test_bad_sample_files(tmp_path, capsys, data):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    (bad / "latent_000002.pt").write_bytes(b"not a torch file")
    check(capsys, ld3_main.main, train_args(bad, tmp_path / "logs"), "latent_000002.pt", "not a valid",
          root=tmp_path)
    torch.save({"latent": torch.zeros(3, 32, 32), "img": torch.zeros(3, 32, 32), "c": None, "uc": None},
               bad / "latent_000002.pt")
    check(capsys, ld3_main.main, train_args(bad, tmp_path / "logs"), "latent_000002.pt", "shape",
          root=tmp_path)
    torch.save({"noise": torch.zeros(1, 8, 8)}, bad / "latent_000002.pt")
    check(capsys, ld3_main.main, train_args(bad, tmp_path / "logs"), "latent_000002.pt", "'latent'",
          root=tmp_path)


def test_bad_load_from(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--all_config", CFG, "--data_dir", str(out), "--save_pt", "--total_samples", "2"]
    check(capsys, gen_data.main, args + ["--load_from", str(tmp_path / "none.pt")], "none.pt", "not found",
          root=tmp_path)
    (tmp_path / "junk.pt").write_text("junk")
    check(capsys, gen_data.main, args + ["--load_from", str(tmp_path / "junk.pt")], "junk.pt", root=tmp_path)
    torch.save({"params1": torch.ones(3)}, tmp_path / "nokey.pt")
    check(capsys, gen_data.main, args + ["--load_from", str(tmp_path / "nokey.pt")], "best_t_steps",
          root=tmp_path)
    torch.save({"best_t_steps": torch.tensor([1.0, 0.5, 0.1, 1.0, 0.5, 0.1])}, tmp_path / "other.pt")
    check(capsys, gen_data.main, args + ["--load_from", str(tmp_path / "other.pt")], "another model",
          root=tmp_path)
    assert not out.exists()


class NaNAfter(torch.nn.Module):
    """The digits mixture, returning NaN from the ``after``-th call on."""

    def __init__(self, inner, after: int):
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x, t, cond=None, uc=None):
        self.calls += 1
        out = self.inner(x, t, cond, uc)
        return out * float("nan") if self.calls > self.after else out


@pytest.mark.parametrize("trainer,where,fix", [("rounds", "optimizer step", "--lr_time_1"),
                                              ("full_batch", "iteration", "--fb_lr_1")])
def test_nan_stops_with_message_and_keeps_best(tmp_path, capsys, data, monkeypatch, trainer, where, fix):
    def loader(cfg, device):
        m = digits_gmm_model("ve")
        m.noise_fn = NaNAfter(m.noise_fn, after=60)
        m.net = m.noise_fn
        return m

    monkeypatch.setitem(registry.FAMILIES, "nan_model", registry.Family("nan_model", loader))
    argv = train_args(data, tmp_path / "logs", "--model", "nan_model",
                      "--training_rounds_v1", "3", "--training_rounds_v2", "3", "--trainer", trainer)
    code = run_cli(ld3_main.main, argv)
    err = capsys.readouterr().err
    assert code == 2
    msg = [x for x in err.splitlines() if x.startswith("error:")][0]
    assert "NaN" in msg and where in msg and fix in msg
    run_dir = next((tmp_path / "logs").iterdir())
    ck = torch.load(run_dir / "best_v2.pt", weights_only=True)
    assert torch.isfinite(ck["best_t_steps"]).all()
    assert not (run_dir / "result.json").exists()
    hist = json.loads((run_dir / "history.json").read_text())
    assert all(torch.isfinite(torch.tensor(h.get("valid_loss", 0.0))) for h in hist)


BAD_VALUES = [
    (["--lr_time_1", "nan"], ["--lr_time_1 nan", "finite"]),
    (["--lr_time_1", "-1"], ["--lr_time_1", "> 0"]),
    (["--lr_time_2", "inf"], ["--lr_time_2 inf", "finite"]),
    (["--win_rate", "-1"], ["--win_rate", ">= 0"]),
    (["--threads", "0"], ["--threads 0", ">= 1"]),
    (["--lr_time_decay", "0"], ["--lr_time_decay", "> 0"]),
    (["--shift_lr", "-2"], ["--shift_lr", ">= 0"]),
    (["--trainer", "rounds", "--training_rounds_v1", "0", "--training_rounds_v2", "0"],
     ["training_rounds_v1 + training_rounds_v2"]),
    (["--fb_iters_v1", "0", "--fb_iters_v2", "0"], ["fb_iters_v1 + fb_iters_v2", "nothing would be learned"]),
    (["--valid_every", "0"], ["--valid_every 0", ">= 1"]),
    (["--patient", "-1"], ["--patient -1", ">= 1"]),
    (["--gits_ts", "80,abc"], ["--gits_ts", "comma-separated numbers"]),
    (["--gmm_components", "0"], ["--gmm_components 0", ">= 1"]),
    (["--flow_shift", "-2"], ["--flow_shift", "> 0 or auto"]),
    (["--momentum_time_1", "1.5"], ["--momentum_time_1", "<= 1"]),
]


@pytest.mark.parametrize("extra,needles", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_values_out_of_range_stop_before_writing(tmp_path, capsys, data, extra, needles):
    """Checked by the same rule on the command line and in the yml, before a run folder exists."""
    logs = tmp_path / "logs"
    check(capsys, ld3_main.main, train_args(data, logs, *extra), *needles, root=tmp_path)
    assert not logs.exists()


@pytest.mark.parametrize("text,needles", [
    ("model: digits_gmm\nsteps: 4.7\n", ["steps", "4.7"]),
    ("model: digits_gmm\nlr_time_1: -3\n", ["lr_time_1: -3.0", "> 0"]),
    ("model: digits_gmm\ngmm_components: 0\n", ["gmm_components: 0", ">= 1"]),
    ("", ["is empty"]),
], ids=["non-integer steps", "negative lr", "zero components", "empty"])
def test_bad_values_in_yml(tmp_path, capsys, data, text, needles):
    cfg = tmp_path / "bad.yml"
    cfg.write_text(text)
    logs = tmp_path / "logs"
    argv = ["--all_config", str(cfg), "--data_dir", str(data), "--log_path", str(logs)]
    check(capsys, ld3_main.main, argv, *needles, root=tmp_path)
    check(capsys, gen_data.main, ["--all_config", str(cfg), "--data_dir", str(tmp_path / "d")], *needles,
          root=tmp_path)


@pytest.mark.parametrize("fn,own,foreign", [
    (gen_data.main, ["--total_samples", "--save_png", "--noise"], ["--lr_time_1", "--num_train", "--teacher_samples"]),
    (ld3_main.main, ["--lr_time_1", "--num_train", "--valid_every"], ["--total_samples", "--teacher_samples"]),
], ids=["gen_data", "main"])
def test_help_lists_own_options_with_the_configs_values(capsys, tmp_path, fn, own, foreign):
    cfg = tmp_path / "c.yml"
    cfg.write_text("model: digits_gmm\nsteps: 7\nlr_time_1: 0.003\ntotal_samples: 33\n")
    with pytest.raises(SystemExit) as e:
        fn(["--all_config", str(cfg), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in own:
        assert f"  {flag} " in out, flag
    for flag in foreign:
        assert f"  {flag} " not in out, flag
    assert "[now 7]" in out  # steps, from the yml
    assert "[now 0.003]" in out or "[now 33]" in out
    assert "solver:" in out and "model:" in out
