"""File-system faults: one line naming the path, exit 2 (a path to change) or 1 (a full disk), no traceback;
what was complete stays complete and readable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import gen_data
import main as ld3_main
import sample as ld3_sample
from ld3.config import run_cli

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")


def one_line(capsys, code: int, expected: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expected, err
    lines = [x for x in err if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return Path(gen_data.main(["--all_config", CFG, "--total_samples", "4", "--sampling_batch_size", "4", "--steps",
                               "6", "--save_pt", "--data_dir", str(tmp_path_factory.mktemp("d"))]))


def test_a_file_where_a_folder_is_needed(tmp_path, capsys, data):
    f = tmp_path / "afile"
    f.write_text("x")
    code = run_cli(ld3_main.main, ["--all_config", CFG, "--data_dir", str(data), "--num_train", "2", "--num_valid",
                                   "2", "--steps", "3", "--log_path", str(f)])
    one_line(capsys, code, 2, str(f), "a file stands where a folder is needed")
    code = run_cli(gen_data.main, ["--all_config", CFG, "--total_samples", "2", "--save_pt", "--data_dir", str(f)])
    one_line(capsys, code, 2, str(f), "a file stands")
    code = run_cli(ld3_sample.main, ["--all_config", CFG, "--skip_type", "edm", "--num_samples", "2", "--metrics",
                                     "none", "--out_dir", str(f / "s")])
    one_line(capsys, code, 2, str(f))
    assert f.read_text() == "x"


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_is_one_line_and_keeps_complete_files(small_disk, capsys):
    code = run_cli(gen_data.main, ["--all_config", CFG, "--total_samples", "100", "--sampling_batch_size", "10",
                                   "--steps", "6", "--save_pt", "--data_dir", str(small_disk)])
    one_line(capsys, code, 1, "No space left on device", str(small_disk))
    folder = next(small_disk.iterdir())
    files = sorted(folder.glob("latent_*.pt"))
    assert files and not list(folder.glob(".*.tmp"))
    for f in files:  # every file there is whole
        d = torch.load(f, weights_only=True)
        assert d["img"].shape == (1, 8, 8)


def test_read_only_folder(small_disk, capsys, data):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    code = run_cli(gen_data.main, ["--all_config", CFG, "--total_samples", "2", "--save_pt", "--data_dir",
                                   str(small_disk / "new")])
    one_line(capsys, code, 2, "Read-only file system", str(small_disk))
    code = run_cli(ld3_main.main, ["--all_config", CFG, "--data_dir", str(data), "--num_train", "2", "--num_valid",
                                   "2", "--steps", "3", "--log_path", str(small_disk / "logs")])
    one_line(capsys, code, 2, "Read-only file system")
    code = run_cli(ld3_sample.main, ["--all_config", CFG, "--skip_type", "edm", "--num_samples", "2", "--metrics",
                                     "none", "--out_dir", str(small_disk / "s")])
    one_line(capsys, code, 2, "Read-only file system")


def test_second_writer_stops_naming_the_first(tmp_path, capsys, data):
    """While one process writes a run or data folder, another stops with one line naming its pid."""
    import os

    from ld3.io import FolderLock

    logs = tmp_path / "logs"
    argv = ["--all_config", CFG, "--data_dir", str(data), "--num_train", "2", "--num_valid", "2", "--steps", "3",
            "--training_rounds_v1", "1", "--training_rounds_v2", "1", "--visualize", "false", "--log_path", str(logs)]
    run_dir = logs / "uni_pc-N3-b0.00711111-L2-lr20.03333333rv11-rv21-seed0"
    with FolderLock(run_dir, "run folder"):
        one_line(capsys, run_cli(ld3_main.main, argv), 2, "being written by another process", f"pid {os.getpid()}")
        assert not (run_dir / "log.txt").exists()
    assert run_cli(ld3_main.main, argv) == 0  # released: the run goes ahead
    assert (run_dir / "best_v2.pt").is_file()
    gen_argv = ["--all_config", CFG, "--total_samples", "2", "--steps", "6", "--save_pt", "--data_dir",
                str(tmp_path / "d")]
    with FolderLock(tmp_path / "d" / "uni_pc_NFE6_edm_seed0", "data folder"):
        one_line(capsys, run_cli(gen_data.main, gen_argv), 2, "data folder", f"pid {os.getpid()}")
    assert run_cli(gen_data.main, gen_argv) == 0
