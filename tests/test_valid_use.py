"""--valid_use: the validation samples are learned from as well (ours) or only choose the checkpoint (the paper's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gen_data
import main as ld3_main
from ld3.cli.main import learning_sets
from ld3.config import parse_config
from ld3.data import SampleSet
from ld3.identity import RECORD
from tests.test_errors import check

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return Path(gen_data.main(["--all_config", CFG, "--total_samples", "8", "--sampling_batch_size", "8",
                               "--steps", "8", "--save_pt", "--data_dir", str(tmp_path_factory.mktemp("data"))]))


def args(data: Path, logs: Path, *extra: str) -> list[str]:
    return ["--all_config", CFG, "--data_dir", str(data), "--steps", "3", "--num_train", "4", "--num_valid", "4",
            "--main_train_batch_size", "2", "--main_valid_batch_size", "4", "--training_rounds_v1", "1",
            "--training_rounds_v2", "1", "--visualize", "false", "--log_path", str(logs), *extra]


def test_learning_sets():
    n = 7
    s = SampleSet(torch.arange(n, dtype=torch.float32).reshape(n, 1), torch.zeros(n, 1), None, None,
                  [Path(f"f{i}") for i in range(n)])
    tr, va = learning_sets(s, 3, 2, "select")
    assert tr.latent.flatten().tolist() == [0, 1, 2] and va.latent.flatten().tolist() == [3, 4]
    tr, va = learning_sets(s, 3, 2, "train")
    assert tr.latent.flatten().tolist() == va.latent.flatten().tolist() == [0, 1, 2, 3, 4]  # never sample 5, 6


def test_default_and_paper_values():
    assert parse_config(["--all_config", CFG], script="main")["valid_use"] == "train"
    assert parse_config(["--all_config", CFG, "--paper_compat"], script="main")["valid_use"] == "select"


def test_main_learns_from_the_validation_samples_too(data, tmp_path):
    """Optimizer steps per round and network calls per sample tell which samples were learned from."""
    ours = Path(ld3_main.main(args(data, tmp_path / "ours", "--trainer", "rounds")))
    paper = Path(ld3_main.main(args(data, tmp_path / "paper", "--trainer", "rounds", "--valid_use", "select")))
    r_ours, r_paper = (json.loads((p / "result.json").read_text()) for p in (ours, paper))
    assert r_ours["optimizer_steps"] == 2 * 4  # 2 rounds x (8 samples / batch 2)
    assert r_paper["optimizer_steps"] == 2 * 2  # 2 rounds x (4 samples / batch 2)
    assert r_ours["best_valid_loss"] != r_paper["best_valid_loss"]  # chosen on other samples
    assert r_ours["samples"] == {"valid_use": "train", "learned_from": 8, "validated_on": 8}
    assert r_paper["samples"] == {"valid_use": "select", "learned_from": 4, "validated_on": 4}
    assert "learning from 8 samples" in (ours / "log.txt").read_text()
    assert "learning from 4 samples" in (paper / "log.txt").read_text()
    assert json.loads((ours / RECORD).read_text())["valid_use"] == "train"


def test_full_batch_learns_from_what_valid_use_says(data, tmp_path):
    """Full batch: the gradient runs over all 8 samples (train) or the first 4 (select, chosen on the other 4)."""
    fb = ("--fb_iters_v1", "3", "--fb_iters_v2", "3")
    ours = Path(ld3_main.main(args(data, tmp_path / "ours", *fb)))
    paper = Path(ld3_main.main(args(data, tmp_path / "paper", *fb, "--valid_use", "select")))
    r_ours, r_paper = (json.loads((p / "result.json").read_text()) for p in (ours, paper))
    assert r_ours["samples"] == {"valid_use": "train", "learned_from": 8, "validated_on": 8}
    assert r_paper["samples"] == {"valid_use": "select", "learned_from": 4, "validated_on": 4}
    # 6 iterations x 3 calls (NFE 3) per learning sample, and one pass at the start (the robust objective's scale)
    assert r_ours["nfe_per_sample"]["train"] == r_paper["nfe_per_sample"]["train"] == (6 + 1) * 3
    assert r_ours["nfe_per_sample"]["validation"] == 2 * 3  # the two phase ends
    assert r_paper["nfe_per_sample"]["validation"] > 2 * 3  # + the starting point and every valid_every


def test_a_run_made_with_the_other_use_is_not_reused(data, tmp_path, capsys):
    logs = tmp_path / "logs"
    ld3_main.main(args(data, logs, "--valid_use", "select"))
    check(capsys, ld3_main.main, args(data, logs), "valid_use", "--overwrite", root=logs)


def test_records_from_before_the_option_count_as_select(data, tmp_path):
    """A run folder recorded before --valid_use existed was made with the validation set for selection only."""
    from tests.test_errors import snapshot

    logs = tmp_path / "logs"
    run = Path(ld3_main.main(args(data, logs, "--valid_use", "select")))
    rec = json.loads((run / RECORD).read_text())
    rec.pop("valid_use")
    (run / RECORD).write_text(json.dumps(rec))
    before = snapshot(logs)
    assert Path(ld3_main.main(args(data, logs, "--valid_use", "select"))) == run  # finished: skipped
    assert snapshot(logs) == before
