"""The package installs as one namespace (ld3) beside other projects, and the layering holds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


SKIP = {".git", ".venv", "train_data", "logs", "samples", "runs", "build", "dist", "__pycache__", "pretrained"}


def _source_files() -> list[str]:
    """The checkout's files (git's list; without git, the tree less outputs and environments)."""
    r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if r.returncode == 0 and r.stdout:
        return r.stdout.decode().split("\0")
    return [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
            if p.is_file() and not SKIP & set(p.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]


def _tracked_copy(dst: Path) -> Path:
    for name in _source_files():
        if not name or not (ROOT / name).is_file():
            continue
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (the checkout is not touched), installed into a folder."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = _tracked_copy(tmp / "src")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    wheel = next((tmp / "dist").glob("ld3-*.whl"))
    site = tmp / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return site


def _env(site: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(site), PYTHONNOUSERSITE="1")


def test_wheel_holds_one_namespace(installed):
    top = {p.name for p in installed.iterdir() if not p.name.endswith((".dist-info", "__pycache__")) and p.name != "bin"}
    assert top == {"ld3"}, top
    assert (installed / "ld3" / "models" / "weights" / "digits_edm_unet.safetensors").is_file()
    assert (installed / "ld3" / "configs" / "cifar10.yml").is_file()
    assert (installed / "ld3" / "configs" / "latent-diffusion" / "cin256-v2.yaml").is_file()


def test_installed_clis_run_beside_a_paper_style_layout(installed, tmp_path):
    """In a working directory holding its own models/ and samplers/ (the paper's layout: samplers/ without
    __init__.py), the user's modules import as before and the installed CLIs run from the wheel alone."""
    work = tmp_path / "work"
    (work / "samplers").mkdir(parents=True)
    (work / "samplers" / "uni_pc.py").write_text("NAME = 'the user code'\n")
    (work / "models").mkdir()
    (work / "models" / "__init__.py").write_text("")
    (work / "models" / "base.py").write_text("class Model:\n    pass\n")
    env = _env(installed)
    r = subprocess.run([sys.executable, "-c", "import samplers.uni_pc, models.base, ld3, ld3.models.base; "
                        "print(samplers.uni_pc.NAME, ld3.__file__)"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "the user code" in r.stdout and str(installed) in r.stdout
    bin_dir = installed / "bin"
    common = ["--all_config", "configs/digits_gmm.yml"]  # not in the working directory: the packaged copy
    steps = [
        ["ld3-gen-data", *common, "--total_samples", "6", "--sampling_batch_size", "6", "--steps", "8", "--save_pt",
         "--data_dir", "data"],
        ["ld3-train", *common, "--data_dir", "data/uni_pc_NFE8_edm_seed0", "--num_train", "3", "--num_valid", "3",
         "--steps", "3", "--training_rounds_v1", "1", "--training_rounds_v2", "1", "--visualize", "false",
         "--log_path", "logs"],
        ["ld3-sample", *common, "--skip_type", "edm", "--steps", "3", "--num_samples", "4", "--metrics", "none",
         "--out_dir", "s"],
    ]
    for argv in steps:
        r = subprocess.run([sys.executable, str(bin_dir / argv[0]), *argv[1:]], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (argv[0], r.stderr[-2000:])
    assert len(list((work / "data" / "uni_pc_NFE8_edm_seed0").glob("latent_*.pt"))) == 6
    assert list((work / "logs").glob("uni_pc-N3-*/best_v2.pt"))
    assert (work / "s" / "samples.npz").is_file()
    r = subprocess.run([sys.executable, str(bin_dir / "ld3-train"), "--all_config", "nope.yml"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


def _modules() -> list[str]:
    out = []
    for p in sorted((ROOT / "src").rglob("*.py")):
        parts = p.relative_to(ROOT / "src").with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    for d in ("samplers", "models"):
        out += [f"ld3.{d}" if p.stem == "__init__" else f"ld3.{d}.{p.stem}" for p in sorted((ROOT / d).glob("*.py"))]
    return out


@pytest.mark.slow
def test_every_module_imports_alone():
    """No import cycle that breaks a first import: each module, alone, in a fresh interpreter."""
    code = ("import subprocess, sys\n"
            "bad = []\n"
            "for m in sys.argv[1:]:\n"
            "    r = subprocess.run([sys.executable, '-c', f'import {m}'], capture_output=True, text=True)\n"
            "    if r.returncode: bad.append((m, (r.stderr.strip().splitlines() or ['?'])[-1]))\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n")
    mods = _modules()
    assert len(mods) > 35 and "ld3.samplers.solvers" in mods and "ld3.cli.main" in mods
    r = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr


def _ld3_imports(path: Path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ld3"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ld3"))
    return out


@pytest.mark.parametrize("layer,allowed", [
    ("samplers", ("ld3.samplers", "ld3.errors")),
    ("models", ("ld3.models", "ld3.samplers", "ld3.errors", "ld3.resources")),
])
def test_layers_import_only_below(layer, allowed):
    """samplers know no model; models know no trainer, config or CLI (function-level imports included)."""
    for p in sorted((ROOT / layer).glob("*.py")):
        bad = {m for m in _ld3_imports(p) if not m.startswith(allowed)}
        assert not bad, (p.name, bad)
