"""A learned schedule inside real diffusers pipelines (tiny, random, offline): ``LD3Scheduler``.

For each pipeline the network must be called at exactly the learned times t'_i (in its own time:
the U-Net's training step, or 1000 t for SD3, t for Flux after its division by 1000), and the
pipeline's output must equal ld3's own sampling with the same solver, order, options and t' != t,
to float32 rounding.
"""

from __future__ import annotations

import json

import pytest
import torch

from ld3.diffusers_scheduler import LD3Scheduler, ld3_scheduler, schedule_of
from ld3.models.base import velocity_noise_fn
from ld3.models.registry import build_model
from ld3.samplers.schedules import FlowSchedule
from ld3.samplers.solvers import solve

from tests.test_stable_diffusion import sd_cfg, write_sd

CPU = torch.device("cpu")

# (solver, order, options): multistep, predictor-corrector and a 2-call-per-step solver
SOLVERS = [("uni_pc", 3, {"variant": "bh2"}), ("dpm_solver++", 2, {}), ("heun", 2, {}), ("ipndm", 4, {})]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal to float32 rounding: the largest difference within ``tol`` of the largest value."""
    err, scale = float((a - b).abs().max()), float(b.abs().max())
    assert err <= tol * scale, (err, scale)
    return True


def learned_times(schedule, steps: int, decoupled: bool = True):
    """A learned-looking grid: logSNR-uniform t, and t' moved off t (as LD3's decoupled times)."""
    from ld3.samplers.discretizations import logsnr

    t = logsnr(schedule, steps)
    tp = t.clone()
    if decoupled:
        tp[:-1] = t[:-1] * torch.linspace(0.97, 1.02, steps, dtype=torch.float64).clamp(max=1.0)
        tp[:-1] = torch.minimum(tp[:-1], torch.full_like(tp[:-1], schedule.T))
    return t, tp


def record_calls(module: torch.nn.Module, arg: int, key: str):
    calls: list[float] = []

    def hook(m, args, kwargs):
        v = args[arg] if len(args) > arg else kwargs[key]
        calls.append(float(torch.as_tensor(v).reshape(-1)[0]))

    return calls, module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from diffusers import DDIMScheduler

    tmp = tmp_path_factory.mktemp("sd")
    w = write_sd(tmp)
    folder = tmp / "sd-tiny"
    w["unet"].save_pretrained(str(folder / "unet"))
    w["vae"].save_pretrained(str(folder / "vae"))
    w["text"].save_pretrained(str(folder / "text_encoder"))
    w["tok"].save_pretrained(str(folder / "tokenizer"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return w, folder


@pytest.mark.parametrize("solver,order,options", SOLVERS)
def test_stable_diffusion_pipeline_samples_as_ld3(sd, solver, order, options):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    w, folder = sd
    model = build_model(sd_cfg(w, ckp_path=str(folder), config=None, scale=3.0), CPU)
    pipe = StableDiffusionPipeline(vae=w["vae"], text_encoder=w["text"], tokenizer=w["tok"], unet=w["unet"],
                                   scheduler=DDIMScheduler.from_pretrained(str(folder / "scheduler")),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    t, tp = learned_times(model.schedule, 4)
    pipe.scheduler = ld3_scheduler((t, tp, solver, order, options), pipe.scheduler)
    c, uc = model.conditions([0, 1], 0, CPU)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    calls, h = record_calls(pipe.unet, 1, "timestep")
    try:
        out = pipe(prompt_embeds=c, negative_prompt_embeds=uc, guidance_scale=3.0, height=16, width=16,
                   latents=z * pipe.scheduler.init_noise_sigma, output_type="latent").images
    finally:
        h.remove()
    seen: list[float] = []

    def ours_fn(x, tt, cond=None, u=None):
        seen.append(float(torch.as_tensor(tt).reshape(-1)[0]))
        return model.noise_fn(x, tt, cond, u)

    with torch.no_grad():
        ref = solve(solver, ours_fn, model.schedule, model.schedule.prior(z), t.float(), tp.float(), order=order,
                    cond=c, uc=uc, **options)
    want = model.schedule.model_time(torch.tensor(seen, dtype=torch.float64))
    assert len(calls) == len(seen) and torch.allclose(torch.tensor(calls, dtype=torch.float64), want, rtol=1e-6)
    assert any(abs(a - b) > 1e-3 for a, b in zip(seen, t.tolist()))  # the network ran at t', not at t
    assert close(out, ref)


def test_v_prediction_pipeline_config_and_reuse(sd, tmp_path):
    """schedule_of reads prediction_type; a second pipeline call starts the solver again."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    w, folder = sd
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="v_prediction")
    schedule, pred = schedule_of(sched.config)
    assert pred == "v_prediction" and schedule.N == 1000
    pipe = StableDiffusionPipeline(vae=w["vae"], text_encoder=w["text"], tokenizer=w["tok"], unet=w["unet"],
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    t, tp = learned_times(schedule, 3, decoupled=False)
    run = tmp_path / "run"  # a run folder as main.py writes it: best_v2.pt (cat(t, t')) and config.yml
    run.mkdir()
    torch.save({"best_t_steps": torch.cat([t, tp]).float()}, run / "best_v2.pt")
    (run / "config.yml").write_text("solver_name: dpm_solver++\norder: 2\nlower_order_final: true\n")
    pipe.scheduler = ld3_scheduler(run, pipe.scheduler)
    assert pipe.scheduler.config.solver_name == "dpm_solver++" and pipe.scheduler.solver_order == 2
    model = build_model(sd_cfg(w, ckp_path=str(folder), config=None, scale=1.0), CPU)
    c, _ = model.conditions([0], 0, CPU)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a = pipe(prompt_embeds=c, guidance_scale=1.0, height=16, width=16, latents=z, output_type="latent").images
    b = pipe(prompt_embeds=c, guidance_scale=1.0, height=16, width=16, latents=z, output_type="latent").images
    assert torch.equal(a, b)
    assert isinstance(pipe.scheduler, LD3Scheduler) and len(pipe.scheduler.timesteps) == 3


def tiny_vae(latent_channels: int = 16):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=latent_channels,
                         layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=1.5,
                         shift_factor=0.1).eval()


@pytest.mark.parametrize("solver,order,options", [("uni_pc", 3, {"variant": "bh2"}), ("euler", 1, {})])
def test_sd3_pipeline_samples_as_ld3(solver, order, options):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                               pooled_projection_dim=24, out_channels=16, pos_embed_max_size=16).eval()
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    sch = FlowSchedule()
    t, tp = learned_times(sch, 4)
    pipe.scheduler = ld3_scheduler((t, tp, solver, order, options), pipe.scheduler)
    g = torch.Generator().manual_seed(0)
    pe, npe = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    pp, npp = torch.randn(2, 24, generator=g), torch.randn(2, 24, generator=g)
    z = torch.randn(2, 16, 8, 8, generator=g)
    calls, h = record_calls(tr, 99, "timestep")
    try:
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pp,
                   negative_pooled_prompt_embeds=npp, guidance_scale=2.0, height=16, width=16,
                   latents=z * pipe.scheduler.init_noise_sigma, output_type="latent").images
    finally:
        h.remove()

    def velocity(x, tt, cond=None, u=None):  # the pipeline's own call and guidance
        ts = (1000 * torch.as_tensor(tt, dtype=torch.float32)).reshape(-1).expand(x.shape[0])
        ts = torch.cat([ts, ts])
        v = tr(hidden_states=torch.cat([x, x]).float(), timestep=ts, encoder_hidden_states=torch.cat([npe, pe]),
               pooled_projections=torch.cat([npp, pp]), return_dict=False)[0]
        vu, vc = v.chunk(2)
        return vu + 2.0 * (vc - vu)

    with torch.no_grad():
        ref = solve(solver, velocity_noise_fn(velocity, sch), sch, sch.prior(z), t.float(), tp.float(),
                    order=order, **options)
    want = (1000 * torch.tensor([float(v) for v in pipe.scheduler._call_times])).tolist()
    assert calls == pytest.approx(want, rel=1e-6)
    assert close(out, ref)


def test_flux_pipeline_samples_as_ld3():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
    vae = tiny_vae()
    pipe = FluxPipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                        vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    sch = FlowSchedule()
    t, tp = learned_times(sch, 4)
    pipe.scheduler = ld3_scheduler((t, tp, "dpm_solver++", 2, {}), pipe.scheduler)
    g = torch.Generator().manual_seed(0)
    pe, pp = torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g)
    # Flux works on packed latents: 2x2 patches of a 16 x 8 x 8 latent -> 16 tokens of 64
    z = torch.randn(1, 16, 64, generator=g)
    calls: list[float] = []
    h = tr.register_forward_pre_hook(lambda m, a, k: calls.append(float(k["timestep"].reshape(-1)[0])),
                                     with_kwargs=True)
    try:
        out = pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, guidance_scale=3.5, height=16, width=16,
                   latents=z * pipe.scheduler.init_noise_sigma, output_type="latent").images
    finally:
        h.remove()
    txt_ids = torch.zeros(5, 3)
    img_ids = pipe._prepare_latent_image_ids(1, 4, 4, CPU, torch.float32)

    def velocity(x, tt, cond=None, u=None):  # as FluxPipeline calls it: time t in (0, 1), guidance embedded
        ts = torch.as_tensor(tt, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        return tr(hidden_states=x.float(), timestep=ts, guidance=torch.full((1,), 3.5), pooled_projections=pp,
                  encoder_hidden_states=pe, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    with torch.no_grad():
        ref = solve("dpm_solver++", velocity_noise_fn(velocity, sch), sch, sch.prior(z), t.float(), tp.float(),
                    order=2)
    assert calls == pytest.approx(pipe.scheduler._call_times.tolist(), rel=1e-6)
    assert close(out, ref)
