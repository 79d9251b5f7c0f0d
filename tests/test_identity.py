"""Data and run folders record what made them; reuse with another model or options stops with one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import gen_data
import main as ld3_main
import sample as ld3_sample
from ld3.config import run_cli
from ld3.identity import RECORD
from tests.test_errors import check, snapshot

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")
PAPER_CFG = str(ROOT / "tests" / "data" / "paper_reference" / "digits_gmm_paper.yml")
GMM = str(ROOT / "tests" / "data" / "paper_reference" / "gmm_digits_diag40.pt")


def gen_args(root: Path, *extra: str) -> list[str]:
    return ["--all_config", CFG, "--total_samples", "4", "--sampling_batch_size", "4", "--steps", "8",
            "--save_pt", "--data_dir", str(root), *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return Path(gen_data.main(gen_args(tmp_path_factory.mktemp("data"))))


def test_gen_data_records_identity(data):
    rec = json.loads((data / RECORD).read_text())
    assert rec["solver_name"] == "uni_pc" and rec["steps"] == 8 and rec["unipc_variant"] == "bh2"
    assert rec["model"]["model_name"] == "digits_gmm" and len(rec["model"]["weights_sha256"]) == 64


@pytest.mark.parametrize("extra,option", [
    (["--unipc_variant", "bh1"], "unipc_variant"),   # a solver option outside the folder name
    (["--gmm_components", "20"], "gmm_components"),  # another model
    (["--order", "2"], "order"),
], ids=["variant", "model", "order"])
def test_gen_data_stops_on_other_options(data, tmp_path, capsys, extra, option):
    root = data.parent
    check(capsys, gen_data.main, gen_args(root, *extra), option, "--overwrite", root=root)


def test_gen_data_same_options_adds_nothing_and_overwrite_regenerates(data, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(data.parent, root)
    before = snapshot(root)
    out = Path(gen_data.main(gen_args(root)))
    assert {k: v for k, v in snapshot(root).items() if not k.endswith(".yml")} == \
        {k: v for k, v in before.items() if not k.endswith(".yml")}
    out2 = Path(gen_data.main(gen_args(root, "--unipc_variant", "bh1", "--overwrite")))
    assert out2 == out
    assert json.loads((out / RECORD).read_text())["unipc_variant"] == "bh1"
    assert snapshot(root)[f"{out.name}/latent_000000.pt"] != before[f"{out.name}/latent_000000.pt"]


def train_args(data: Path, logs: Path, *extra: str) -> list[str]:
    return ["--all_config", CFG, "--data_dir", str(data), "--steps", "3", "--num_train", "2", "--num_valid", "2",
            "--log_path", str(logs), "--training_rounds_v1", "1", "--training_rounds_v2", "1",
            "--visualize", "false", *extra]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    return Path(ld3_main.main(train_args(data, tmp_path_factory.mktemp("logs"))))


@pytest.mark.parametrize("extra,option", [
    (["--lr_time_1", "0.01"], "lr_time_1"),
    (["--order", "2"], "order"),
    (["--win_rate", "0.3"], "win_rate"),
    (["--gmm_components", "20"], "gmm_components"),
], ids=["lr_time_1", "order", "win_rate", "model"])
def test_main_stops_on_other_options(run, data, capsys, extra, option):
    logs = run.parent
    check(capsys, ld3_main.main, train_args(data, logs, *extra), option, "--log_path", root=logs)


def test_main_stops_on_other_data(run, data, tmp_path, capsys):
    other = Path(gen_data.main(gen_args(tmp_path / "other", "--noise", "paper")))
    check(capsys, ld3_main.main, train_args(other, run.parent), "data", root=run.parent)


def test_main_skips_finished_run_only_on_full_match(run, data, tmp_path):
    import shutil

    logs = tmp_path / "logs"
    shutil.copytree(run.parent, logs)
    before = snapshot(logs)
    assert Path(ld3_main.main(train_args(data, logs))) == logs / run.name
    assert snapshot(logs) == before  # finished, same everything: nothing rerun, nothing written
    assert Path(ld3_main.main(train_args(data, logs, "--resume"))) == logs / run.name
    assert snapshot(logs) == before
    ld3_main.main(train_args(data, logs, "--lr_time_1", "0.01", "--overwrite"))
    rec = json.loads((logs / run.name / RECORD).read_text())
    assert rec["lr_time_1"] == 0.01


def test_run_folder_without_record_is_not_reused(data, tmp_path, capsys):
    """A folder the paper's code made (best_v2.pt, no record) is not taken for ours."""
    logs = tmp_path / "logs"
    probe = Path(ld3_main.main(train_args(data, tmp_path / "probe")))
    folder = logs / probe.name
    folder.mkdir(parents=True)
    (folder / "best_v2.pt").write_bytes((probe / "best_v2.pt").read_bytes())
    check(capsys, ld3_main.main, train_args(data, logs), "no record", "--overwrite", root=logs)


def test_sample_needs_a_teacher(tmp_path, capsys):
    """Without teacher files or gen_config.yml, sample.py must be told the teacher (one line, exit 2)."""
    base = ["--all_config", PAPER_CFG, "--ckp_path", GMM, "--skip_type", "edm", "--num_samples", "4",
            "--metrics", "teacher", "--teacher_distances", "L2", "--out_dir", str(tmp_path / "s")]
    check(capsys, ld3_sample.main, base, "teacher", "--teacher solver_name=", root=tmp_path)
    assert run_cli(ld3_sample.main, base + ["--teacher", "solver_name=uni_pc,steps=20,skip_type=edm,"
                                            "unipc_variant=bh1"]) == 0
    rep = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert rep["teacher"]["solver"] == "uni_pc" and rep["teacher"]["nfe"] == 20
    check(capsys, ld3_sample.main, base + ["--teacher", "steps=20"], "--teacher needs solver_name")


def test_records_from_before_an_option_existed_still_match(data, tmp_path, capsys):
    """A record written before final_denoise existed means final_denoise=False: reused, not a mismatch;
    asking for final_denoise=True is one."""
    import shutil

    root = tmp_path / "old"
    shutil.copytree(data.parent, root)
    folder = root / data.name
    rec = json.loads((folder / RECORD).read_text())
    rec.pop("final_denoise")
    (folder / RECORD).write_text(json.dumps(rec))
    before = snapshot(root)
    assert Path(gen_data.main(gen_args(root))) == folder
    assert snapshot(root) == before
    check(capsys, gen_data.main, gen_args(root, "--final_denoise"), "final_denoise", root=root)


def test_file_digest_caches_only_large_files_and_reads_the_cache_once(tmp_path, monkeypatch):
    import hashlib

    from ld3 import identity

    def sha(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()

    def stored() -> dict:
        return json.loads(identity._cache_file().read_text())

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(identity, "_cache", {})
    monkeypatch.setattr(identity, "CACHE_MIN_BYTES", 100)
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    small.write_bytes(b"x" * 99)
    large.write_bytes(b"y" * 100)
    assert identity.file_digest(small) == sha(b"x" * 99)
    assert not identity._cache_file().exists()  # small files are hashed, never cached
    assert identity.file_digest(large) == sha(b"y" * 100)
    (key, digest), = stored().items()
    assert key.startswith(str(large.resolve())) and digest == sha(b"y" * 100)
    # the file is read once per process: a changed file on disk is not seen, the entries held are
    identity._cache_file().write_text(json.dumps({key: "from the file"}))
    assert identity.file_digest(large) == digest
    monkeypatch.setattr(identity, "_cache", {})  # a new process reads the file
    assert identity.file_digest(large) == "from the file"
    # the same size, a later mtime: hashed again, not the held entry
    st = large.stat()
    large.write_bytes(b"z" * 100)
    os.utime(large, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert identity.file_digest(large) == sha(b"z" * 100)
    # entries another process wrote after this one read the file are kept when this one writes
    identity._cache_file().write_text(json.dumps({**stored(), "elsewhere|1|1": "from another process"}))
    (tmp_path / "large2.bin").write_bytes(b"w" * 100)
    assert identity.file_digest(tmp_path / "large2.bin") == sha(b"w" * 100)
    assert stored()["elsewhere|1|1"] == "from another process" and len(stored()) == 4
    monkeypatch.setattr(identity, "CACHE_MAX_ENTRIES", 2)
    for i in range(3):  # at most CACHE_MAX_ENTRIES, the oldest dropped
        (tmp_path / f"big{i}.bin").write_bytes(bytes([i]) * 100)
        identity.file_digest(tmp_path / f"big{i}.bin")
    assert [Path(k.split("|")[0]).name for k in stored()] == ["big1.bin", "big2.bin"]
