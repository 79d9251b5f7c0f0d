"""The embedded rectified-flow digits model (``DigitsFlow``, family ``digits_flow``): its card and stored
outputs, the preconditioning's closed forms, the velocity -> noise conversion, and LD3 on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ld3.models.digits_unet import (DEFAULT_FLOW_WEIGHTS, DIGITS_IMG_SHAPE, DigitsFlow, count_parameters,
                                    load_digits_flow, sha256_of)

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_flow.yml")
REFERENCE = Path(__file__).resolve().parent / "data" / "digits_flow_reference.safetensors"


@pytest.fixture(scope="module")
def flow() -> DigitsFlow:
    return load_digits_flow()


def _card() -> dict:
    return json.loads(DEFAULT_FLOW_WEIGHTS.with_suffix(".json").read_text())


def test_shipped_flow_model_and_its_card(flow):
    card = _card()
    assert not flow.training and count_parameters(flow) == card["params"]
    assert sha256_of(DEFAULT_FLOW_WEIGHTS) == card["sha256"]
    assert card["training"]["threads"] == 1 and card["training"]["train_seconds"] <= 25 * 60
    assert card["quality"]["targets_met"], card["quality"]


def test_output_matches_stored_reference(flow):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(REFERENCE), "pt") as f:
        assert f.metadata()["weights_sha256"] == _card()["sha256"], "reference made for other weights"
    ref = load_file(str(REFERENCE))
    for t, expected in zip(ref["times"], ref["v"]):
        torch.testing.assert_close(flow(ref["x"], t), expected, rtol=1e-4, atol=1e-5)


def test_untrained_velocity_is_the_exact_one_for_gaussian_data():
    """At initialisation F = 0, so v = c_skip x: the exact velocity E[eps - x0 | x_t] when x0 ~ N(0, sd^2 I);
    what is left of v has variance c_out^2 (checked on 10^6 draws, tolerances about 4 standard errors)."""
    net = DigitsFlow().eval()
    sd = net.sigma_data
    g = torch.Generator().manual_seed(0)
    for t in (0.05, 0.3, 0.6, 0.95):
        x0 = sd * torch.randn(1_000_000, 1, 1, 1, generator=g, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        xt = (1 - t) * x0 + t * eps
        v = eps - x0
        a = float((v * xt).mean() / (xt * xt).mean())  # least-squares slope of v on x_t
        c_skip, c_out, c_in, _ = net.preconditioning(torch.tensor(t, dtype=torch.float64))
        assert a == pytest.approx(float(c_skip), abs=1e-2)
        assert float((v - c_skip * xt).var()) == pytest.approx(float(c_out) ** 2, rel=1e-2)
        assert float((c_in * xt).var()) == pytest.approx(1.0, rel=1e-2)
    x = torch.randn(3, *DIGITS_IMG_SHAPE, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    c_skip = net.preconditioning(t.reshape(-1, 1, 1, 1))[0]
    torch.testing.assert_close(net(x, t), c_skip * x)


def test_model_record_turns_velocity_into_noise(flow):
    """eps = x + (1 - t) v for x_t = (1 - t) x0 + t eps and v = eps - x0; the data prediction x - t v."""
    from ld3.config import parse_config
    from ld3.models.registry import build_model

    model = build_model(parse_config(["--all_config", CFG]), torch.device("cpu"))
    assert model.schedule.name == "flow" and model.info["dataset"] == "digits"
    x = torch.randn(4, *DIGITS_IMG_SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.02, 0.3, 0.7, 0.98], dtype=torch.float64)
    v = flow(x, t)
    torch.testing.assert_close(model.noise_fn(x, t), x + (1 - t.reshape(-1, 1, 1, 1)) * v)


def test_missing_weights_are_one_line(tmp_path, capsys):
    from ld3.cli import main as ld3_main
    from ld3.config import run_cli

    code = run_cli(ld3_main.main, ["--all_config", CFG, "--ckp_path", str(tmp_path / "none.safetensors"),
                                   "--data_dir", str(tmp_path), "--log_path", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not found" in err[0] and not (tmp_path / "logs").exists()


def readme_flow_commands() -> list[list[str]]:
    """The bash block of README's "The embedded flow model" section, as argv lists."""
    import shlex

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### The embedded flow model"):]
    block = section[section.index("```bash\n") + 8:]
    block = block[:block.index("```")]
    return [shlex.split(cmd) for cmd in block.replace("\\\n", " ").splitlines() if cmd.strip()]


@pytest.mark.slow
def test_readme_flow_commands_learn_a_schedule_ahead_of_every_baseline(tmp_path, monkeypatch):
    """README's two commands for the flow model, as written (in an empty working directory; the config is the
    packaged copy): teacher uni_pc 20 NFE on uniform t, LD3 uni_pc NFE 6 with the config's defaults (100 + 100
    samples). The schedule is closer to the teacher on 300 fresh noises than uniform t, SD3's shift 3, logSNR,
    EDM/Karras and the paper's other grids (measured: 0.0028 vs uniform t's 0.0041, the best baseline)."""
    from ld3.cli import gen_data
    from ld3.cli import main as ld3_main
    from ld3.config import parse_config
    from ld3.discretization import load_learned_times
    from ld3.evaluate import compare_with_baselines
    from ld3.losses import l2_distance
    from ld3.models.registry import build_model

    monkeypatch.chdir(tmp_path)
    (gen, gen_args), (train, train_args) = ((c[1], c[2:]) for c in readme_flow_commands())
    assert (gen, train) == ("gen_data.py", "main.py")
    data = gen_data.main(gen_args)
    run = ld3_main.main(train_args)
    assert Path(data).resolve() == (tmp_path / train_args[train_args.index("--data_dir") + 1]).resolve()
    t, tp = load_learned_times(Path(run) / "best_v2.pt")
    cfg = {**parse_config(["--all_config", CFG, "--steps", "6"]), "data_dir": str(data), "visualize": False}
    model = build_model(cfg, torch.device("cpu"))
    rows = compare_with_baselines(cfg, model, torch.device("cpu"), {"LD3": (t, tp)}, 300, l2_distance)
    assert {"time_uniform", "sd3_shift", "logSNR", "karras", "edm", "time_quadratic"} <= rows.keys()
    for name, d in rows.items():
        if name != "LD3":
            assert rows["LD3"] < d, (name, rows)


def test_demo_runs_on_the_flow_model(tmp_path, capsys):
    """scripts/demo.py (make demo's second part) on the flow config, small: its table names every baseline."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ld3_demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--config", CFG, "--solvers", "uni_pc", "--nfe", "4", "--n_teacher", "20", "--n_fresh", "20",
                      "--out", str(tmp_path)]) == 0
    table = (tmp_path / "summary.md").read_text()
    assert table.startswith("digits_flow: distance to the teacher")
    for name in ("LD3", "sd3_shift", "karras", "logSNR", "time_uniform", "edm", "time_quadratic"):
        assert f"| {name} |" in table
    assert "uni_pc 20 NFE, time_uniform" in capsys.readouterr().out
