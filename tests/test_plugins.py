"""README's plugin example, run as written: a model family, a solver and a loss added from one file.

The file is README's block verbatim; the commands load it with ``--plugins``. What would fail if
the generic paths were wrong: the family's typed option (``--width``) must reach its loader and the
run identity, the plugin solver must equal DPM-Solver++ of order 1 (the same method) on the blob's
exact noise prediction and make one network call per step, and the plugin loss must be the one the
run used (its validation loss equals the Huber distance of the learned schedule recomputed here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gen_data
import main as ld3_main
import sample as ld3_sample
from ld3.config import run_cli
from ld3.losses import LOSSES
from ld3.models import registry
from ld3.samplers import solvers

ROOT = Path(__file__).resolve().parents[1]


def readme_plugin() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("<!-- plugin-example -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """README's plugin file in a working directory; the registries are restored afterwards."""
    import sys

    saved = [(d, dict(d)) for d in (registry.FAMILIES, solvers.SOLVERS, LOSSES)]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_ld3_plugin.py").write_text(readme_plugin())
    yield tmp_path
    for d, copy in saved:
        d.clear()
        d.update(copy)
    sys.modules.pop("ld3_plugin_my_ld3_plugin", None)


def common(*extra: str) -> list[str]:
    return ["--all_config", str(ROOT / "configs" / "digits_gmm.yml"), "--plugins", "my_ld3_plugin.py",
            "--model", "blob", "--width", "0.3", *extra]


def test_readme_plugin_runs_through_the_three_commands(plugin, capsys):
    data = gen_data.main(common("--total_samples", "12", "--sampling_batch_size", "6", "--steps", "12",
                                "--solver_name", "uni_pc", "--skip_type", "edm", "--save_pt",
                                "--data_dir", "data"))
    ident = json.loads((Path(data) / "ld3_identity.json").read_text())
    assert ident["model"]["model"] == "blob" and ident["model"]["width"] == 0.3

    # the plugin solver is DDIM: equal to DPM-Solver++ order 1, one call per step
    blob = registry.build_model({"model": "blob", "width": 0.3}, torch.device("cpu"))
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64) * 80
    t = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.002], dtype=torch.float64)
    calls = []

    def fn(x_, t_, c=None, u=None):
        calls.append(1)
        return blob.noise_fn(x_, t_)

    ours = solvers.solve("ddim", fn, blob.schedule, x, t)
    assert len(calls) == 4
    ref = solvers.solve("dpm_solver++", blob.noise_fn, blob.schedule, x, t, order=1)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-10)

    run = ld3_main.main(common("--data_dir", str(data), "--num_train", "6", "--num_valid", "6",
                               "--main_train_batch_size", "2", "--main_valid_batch_size", "6", "--steps", "3",
                               "--solver_name", "ddim", "--order", "1", "--loss_type", "huber", "--training_rounds_v1", "1",
                               "--training_rounds_v2", "1", "--visualize", "false", "--log_path", "logs",
                               "--fix_bound", "true", "--prior_bound", "0",  # latents fixed: the check below is exact
                               "--fb_robust", "0"))  # the full-batch objective is then the plain mean of the distance
    run = Path(run)
    assert run.name.startswith("ddim-N3-") and "-huber-" in run.name
    result = json.loads((run / "result.json").read_text())
    assert result["nfe_per_sample"]  # it trained

    # the loss the run used is the plugin's: its best validation loss is the Huber distance recomputed here
    from ld3.data import load_samples
    from ld3.discretization import load_learned_times

    # validated on all 12 files (--valid_use train: the 6 validation files are learned from too)
    samples = load_samples(Path(data), 12, blob.latent_shape, blob.latent_shape)
    tl, tpl = load_learned_times(run / "best_v2.pt")
    x_t = blob.schedule.prior(samples.latent)  # float32, as the run's rollouts (its loss is near float32 rounding)
    img = solvers.solve("ddim", blob.noise_fn, blob.schedule, x_t, tl.double(), tpl.double())
    huber = torch.nn.functional.smooth_l1_loss(img.float(), samples.img.float(), reduction="none").flatten(1).mean(1)
    assert abs(float(huber.mean()) - result["best_valid_loss"]) < 1e-4 * result["best_valid_loss"]

    out = ld3_sample.main(common("--load_from", str(run), "--solver_name", "ddim", "--order", "1", "--num_samples", "4",
                                 "--sampling_batch_size", "4", "--metrics", "none", "--out_dir", "smp"))
    assert (Path(out) / "samples.npz").is_file()


def test_plugin_options_are_listed_and_checked(plugin, capsys):
    with pytest.raises(SystemExit):
        ld3_main.main(common("--help"))
    text = capsys.readouterr().out
    assert "--width" in text and "std of the data [blob]" in text
    code = run_cli(ld3_main.main, common("--width", "-1", "--data_dir", "nowhere"))
    err = capsys.readouterr().err
    assert code == 2 and "--width -1" in err and ">= 0" in err
    assert not Path("logs").exists()


def test_missing_plugin_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = run_cli(ld3_main.main, ["--all_config", str(ROOT / "configs" / "digits_gmm.yml"),
                                   "--plugins", "nope.py"])
    err = capsys.readouterr().err
    assert code == 2 and "--plugins: nope.py not found" in err
