"""Export of learned runs (JSON) and its use in diffusers: round trip, sigmas, timesteps, a denoising loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
from ld3.discretization import LearnedDiscretization, checkpoint_dict
from ld3.export import diffusers_timesteps, export_dict, times_from_export
from ld3.models.analytic import digits_gmm_model
from ld3.samplers.schedules import VESchedule, VPDiscreteSchedule
from ld3.samplers.solvers import solve

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "configs" / "digits_gmm.yml")
VP_KW = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _learned(schedule, steps: int, mode: str, seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A checkpoint in the paper's format with random (monotone) times and decoupled t'."""
    disc = LearnedDiscretization(schedule, steps, mode)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        disc.params1.copy_(torch.randn(steps + 1, generator=g, dtype=torch.float64) * 0.5)
        disc.params2.copy_(torch.randn(steps + 1, generator=g, dtype=torch.float64))
        t, tp = disc()
    return checkpoint_dict(disc), t, tp


def _export(tmp_path: Path, ck: dict, *extra: str) -> dict:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    torch.save(ck, run / "best_v2.pt")
    out = tmp_path / "export.json"
    sample.main(["--all_config", CFG, "--export", str(run), "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_round_trip_ve(tmp_path):
    ck, t, tp = _learned(VESchedule(), 5, "lambda")
    d = _export(tmp_path, ck, "--solver_name", "ipndm", "--order", "3")
    t2, tp2 = times_from_export(d)
    assert torch.equal(t2, t) and torch.equal(tp2, tp), "JSON must give back the learned times exactly"
    assert d["solver"] == "ipndm" and d["order"] == 3 and d["steps"] == 5 and d["nfe"] == 5
    assert d["sigmas"][-1] == 0.0 and len(d["sigmas"]) == len(d["t"]) + 1
    assert d["sigmas"][:-1] == d["t"], "VE: the EDM noise level is t itself"
    assert d["lambda"] == pytest.approx([-float(torch.log(x)) for x in t], rel=1e-12)
    assert all(a > b for a, b in zip(d["sigmas"], d["sigmas"][1:]))
    assert d["decoupled"] is True and "t' != t" in d["note"] and "timesteps" not in d


def test_solver_from_run_config_and_no_note_without_decoupling(tmp_path):
    sch = VESchedule()
    disc = LearnedDiscretization(sch, 4, "lambda")
    ck = checkpoint_dict(disc)  # params2 = 0: t' = t
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yml").write_text("solver_name: heun\nsteps: 7\norder: 2\n")
    d = _export(tmp_path, ck)
    assert d["solver"] == "heun" and d["nfe"] == 7 and d["steps"] == 4
    assert d["decoupled"] is False and "t' != t" not in d["note"]


def test_timesteps_vp_discrete(tmp_path):
    sch = VPDiscreteSchedule.linear(1000)
    ck, t, tp = _learned(sch, 6, "time", seed=3)
    d = _export(tmp_path, ck, "--schedule", "vp_discrete")
    assert torch.equal(times_from_export(d)[0], t)
    ts = d["timesteps"]
    assert len(ts) == 6 and all(isinstance(k, int) for k in ts)
    assert all(a > b for a, b in zip(ts, ts[1:])), "strictly descending, no duplicates"
    assert ts[0] == 999 and ts[-1] >= 1 and all(0 <= k <= 999 for k in ts)
    exact = sch.model_time(t[:-1])
    assert max(abs(a - float(b)) for a, b in zip(ts, exact)) <= 0.5 + 1e-9
    assert d["schedule"]["num_train_timesteps"] == 1000 and d["sigmas"][-1] == 0.0


def test_timesteps_never_collide_or_end_at_zero():
    sch = VPDiscreteSchedule.linear(1000)
    n = 1000
    # crowded at both ends: all of these would round to 999 / 0
    t = torch.tensor([1.0, 1.0 - 0.1 / n, 1.0 - 0.2 / n, 0.5, 1.3 / n, 1.2 / n, 1.1 / n, 1.0 / n], dtype=torch.float64)
    ts, moved = diffusers_timesteps(t, sch)
    assert ts == [999, 998, 997, 499, 3, 2, 1]
    assert moved == pytest.approx(2.7, abs=1e-6)


# --------------------------------------------------------------------------- diffusers
diffusers = pytest.importorskip("diffusers")


def _retrieve():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    return retrieve_timesteps


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A StableDiffusionPipeline from tiny random components, built offline (no hub download).

    The UNet records the timestep of every call.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    (d / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=4, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 8), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DPMSolverMultistepScheduler(**VP_KW, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    calls: list[float] = []

    def record(module, args, kwargs):
        calls.append(float(args[1] if len(args) > 1 else kwargs["timestep"]))

    unet.register_forward_pre_hook(record, with_kwargs=True)
    return pipe, calls


@pytest.mark.parametrize("kind", ["timesteps", "sigmas"])
def test_tiny_diffusers_pipeline_uses_exported_schedule(tiny_sd, kind):
    """pipe(..., timesteps=...) / pipe(..., sigmas=...) of a Stable Diffusion pipeline with the exported lists."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    pipe, calls = tiny_sd
    sch = VPDiscreteSchedule.linear(1000)
    t = torch.tensor([1.0, 0.62, 0.3, 0.11, 0.04, 0.001], dtype=torch.float64)
    d = export_dict(t, t, sch, solver="dpm_solver++", order=2)
    calls.clear()
    if kind == "timesteps":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, solver_order=2,
                                                                 use_karras_sigmas=False,
                                                                 final_sigmas_type="sigma_min")
        out = pipe("a", timesteps=d["timesteps"], guidance_scale=1.0, height=8, width=8, output_type="np")
        want = [float(k) for k in d["timesteps"]]
        assert pipe.scheduler.sigmas[-1] == pytest.approx(d["sigmas"][-2], rel=1e-4), "stops at sigma_min"
    else:
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=False)
        out = pipe("a", sigmas=d["sigmas"], guidance_scale=1.0, height=8, width=8, output_type="np")
        want = sch.model_time(t).tolist()  # S + 1 calls: the last from sigma_min to 0
        assert pipe.scheduler.sigmas.tolist() == pytest.approx(d["sigmas"], rel=1e-4)
    assert calls == pytest.approx(want, abs=0.02)
    assert out.images.shape == (1, 8, 8, 3) and np.isfinite(out.images).all()


def test_diffusers_dpmsolver_reproduces_ld3_solver():
    """diffusers' DPM-Solver++(2M) with the exported timesteps = ld3's dpm_solver++ order 2 on those times."""
    from diffusers import DPMSolverMultistepScheduler

    model = digits_gmm_model("vp_discrete")
    sch = model.schedule
    n = sch.N
    ks = [999, 640, 310, 150, 60, 15]
    t = torch.tensor([(k + 1) / n for k in ks] + [1 / n], dtype=torch.float64)
    d = export_dict(t, t, sch, solver="dpm_solver++", order=2)
    assert d["timesteps"] == ks
    scheduler = DPMSolverMultistepScheduler(**VP_KW, solver_order=2, algorithm_type="dpmsolver++",
                                            final_sigmas_type="sigma_min")
    timesteps, _ = _retrieve()(scheduler, timesteps=d["timesteps"])
    z = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = z.float()
    with torch.no_grad():
        for ts in timesteps:
            eps = model.noise_fn(x.double(), torch.full((x.shape[0],), (float(ts) + 1) / n), None, None)
            x = scheduler.step(eps.float(), ts, x).prev_sample
        ours = solve("dpm_solver++", model.noise_fn, sch, sch.prior(z), times_from_export(d)[0], None, order=2)
    assert (x.double() - ours).abs().max() < 1e-4 * ours.abs().max()


def test_edm_karras_ramp_in_diffusers_edm_scheduler():
    from diffusers import EDMEulerScheduler

    ck_t = torch.tensor([80.0, 9.3, 1.7, 0.41, 0.05, 0.002], dtype=torch.float64)
    d = export_dict(ck_t, ck_t, VESchedule(), solver="euler", order=1)
    s = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_schedule="karras", rho=7.0,
                          final_sigmas_type="sigma_min")
    s.set_timesteps(sigmas=torch.tensor(d["edm_karras_ramp"]))
    assert s.sigmas[:-1].tolist() == pytest.approx(d["sigmas"][:-1], rel=1e-5)


def test_export_carries_the_solver_options_of_the_run(tmp_path):
    """Every option that changes a step travels in the JSON, as the run used it (else the solver's default)."""
    sch = VESchedule()
    ck = checkpoint_dict(LearnedDiscretization(sch, 4, "lambda"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yml").write_text("solver_name: uni_pc\nsteps: 4\norder: 3\nunipc_variant: bh1\n"
                                                 "lower_order_final: false\n")
    d = _export(tmp_path, ck)
    assert d["solver_options"] == {"variant": "bh1", "lower_order_final": False, "final_denoise": False}
    (tmp_path / "run" / "config.yml").write_text("solver_name: dpm_solver++\nsteps: 4\norder: 3\n")
    d = _export(tmp_path, ck)
    assert d["solver_options"] == {"lower_order_final": True, "third_order": "exact", "final_denoise": False}


def _doc_snippet(marker: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "EVALUATION.md").read_text()
    return text.split(marker, 1)[1].split("```python", 1)[1].split("```", 1)[0]


def test_docs_diffusers_snippet_runs_as_written(tiny_sd, tmp_path):
    """docs/EVALUATION.md's diffusers block, verbatim: a saved tiny SD folder and an exported JSON."""
    pipe, _ = tiny_sd
    folder = tmp_path / "sd"
    pipe.save_pretrained(str(folder))
    t = torch.tensor([1.0, 0.62, 0.3, 0.11, 0.04, 0.001], dtype=torch.float64)
    path = tmp_path / "ld3_sd_dpmpp.json"
    path.write_text(json.dumps(export_dict(t, t, VPDiscreteSchedule.linear(1000), solver="dpm_solver++", order=2)))
    env = {"folder": str(folder), "export_json": str(path), "prompt": "a"}
    exec(compile(_doc_snippet("<!-- diffusers-json-snippet -->"), "EVALUATION.md", "exec"), env)
    assert env["image"].size == (8, 8) and env["pipe"].scheduler.sigmas.numel() == len(t) + 1  # sigmas= ends in 0


def test_docs_k_diffusion_snippet_runs_as_written(tmp_path, monkeypatch):
    """docs/EVALUATION.md's k-diffusion block, verbatim (where k-diffusion is installed)."""
    pytest.importorskip("k_diffusion")
    ck, _, _ = _learned(VESchedule(), 4, "lambda")
    (tmp_path / "run").mkdir()
    torch.save(ck, tmp_path / "run" / "best_v2.pt")
    (tmp_path / "run" / "config.yml").write_text("solver_name: dpm_solver++\norder: 2\n")
    monkeypatch.chdir(tmp_path)
    sample.main(["--all_config", "configs/digits.yml", "--export", "run", "--out", "ld3_digits.json"])
    env: dict = {}
    exec(compile(_doc_snippet("<!-- k-diffusion-snippet -->"), "EVALUATION.md", "exec"), env)
    assert env["samples"].shape == (16, 1, 8, 8) and torch.isfinite(env["samples"]).all()
