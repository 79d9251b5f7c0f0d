"""``--model diffusers``: tiny randomly initialised SD3 and Flux pipelines written to disk in diffusers'
format (no hub), loaded by diffusers' own classes offline.

What would fail if the family were wrong: its noise prediction (the pipeline's velocity, guidance as
the pipeline does it, prompts encoded by the pipeline) sampled by ld3's solver must equal the
pipeline's own output when the pipeline runs the same schedule (``LD3Scheduler``), latents and
decoded images both; gen_data and main must run on the folders from the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ld3.diffusers_scheduler import ld3_scheduler
from ld3.models.registry import build_model
from ld3.samplers.solvers import solve

from tests.test_diffusers_scheduler import close, learned_times, tiny_vae
from tests.test_stable_diffusion import PROMPTS, write_clip_folder

CPU = torch.device("cpu")


def t5_parts(folder: Path, dim: int = 32):
    """A T5 tokenizer (Unigram, tokenizer.json) and a 1-layer T5 encoder with random weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words] + \
        [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    t5_tok = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                             extra_ids=0, model_max_length=512)
    torch.manual_seed(1)
    enc = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=dim, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                  decoder_start_token_id=0)).eval()
    return t5_tok, enc


def clip_parts(folder: Path, seed: int, projection: bool):
    from transformers import CLIPTextModelWithProjection

    tok, text = write_clip_folder(folder, seed)
    tok.model_max_length = 77
    if projection:
        torch.manual_seed(seed)
        text = CLIPTextModelWithProjection(text.config).eval()
    return tok, text


def captions(tmp: Path) -> Path:
    p = tmp / "captions.json"
    p.write_text(json.dumps({"annotations": [{"image_id": i, "id": i, "caption": c} for i, c in enumerate(PROMPTS)]}))
    return p


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tmp = tmp_path_factory.mktemp("sd3")
    tok1, te1 = clip_parts(tmp / "clip1", 0, True)
    tok2, te2 = clip_parts(tmp / "clip2", 1, True)
    tok3, te3 = t5_parts(tmp / "t5", dim=64)
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                               pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16).eval()
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(), text_encoder=te1, tokenizer=tok1, text_encoder_2=te2,
                                    tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)
    folder = tmp / "sd3-tiny"
    pipe.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tmp = tmp_path_factory.mktemp("flux")
    tok1, te1 = clip_parts(tmp / "clip", 0, False)
    tok2, te2 = t5_parts(tmp / "t5")
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
    pipe = FluxPipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                        vae=tiny_vae(), text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2)
    folder = tmp / "flux-tiny"
    pipe.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tmp = tmp_path_factory.mktemp("sdxl")
    tok1, te1 = clip_parts(tmp / "clip1", 0, False)
    tok2, te2 = clip_parts(tmp / "clip2", 1, True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=(2, 4), norm_num_groups=8, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(4), text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched)
    folder = tmp / "sdxl-tiny"
    pipe.save_pretrained(str(folder))
    return folder


def family_cfg(folder: Path, scale: float, **extra) -> dict:
    return {"model": "diffusers", "ckp_path": str(folder), "prompt_path": str(captions(folder.parent)),
            "num_prompts": 3, "scale": scale, "H": 16, "W": 16, "max_sequence_length": 8, **extra}


@pytest.mark.parametrize("kind,solver,order", [("sd3", "uni_pc", 3), ("flux", "dpm_solver++", 2),
                                               ("sdxl", "uni_pc", 2)])
def test_pipeline_folder_samples_as_the_pipeline(kind, solver, order, sd3_folder, flux_folder, sdxl_folder):
    from diffusers import DiffusionPipeline

    folder = {"sd3": sd3_folder, "flux": flux_folder, "sdxl": sdxl_folder}[kind]
    scale = {"sd3": 2.0, "flux": 3.5, "sdxl": 4.0}[kind]
    model = build_model(family_cfg(folder, scale), CPU)
    assert model.schedule.name == ("vp_discrete" if kind == "sdxl" else "flow")
    assert model.info["pipeline"].startswith(("StableDiffusion3", "Flux", "StableDiffusionXL"))
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    t, tp = learned_times(model.schedule, 4)
    pipe.scheduler = ld3_scheduler((t, tp, solver, order, {}), pipe.scheduler)
    z = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(2))
    kw = dict(prompt=PROMPTS[:2], guidance_scale=scale, height=16, width=16)
    if kind != "sdxl":
        kw.update(max_sequence_length=8)
    if kind == "sd3":
        kw.update(negative_prompt=["", ""], latents=z * pipe.scheduler.init_noise_sigma)
    elif kind == "sdxl":  # the pipeline's default negative: zeros (force_zeros_for_empty_prompt)
        kw.update(latents=z * pipe.scheduler.init_noise_sigma)
    else:  # Flux takes packed latents
        kw.update(latents=type(pipe)._pack_latents(z * pipe.scheduler.init_noise_sigma, 2, 16, 8, 8))
    with torch.no_grad():
        lat = pipe(output_type="latent", **kw).images
        if kind == "flux":
            lat = type(pipe)._unpack_latents(lat, 16, 16, 2)
        c, uc = model.conditions([0, 1], 0, CPU)
        ours = solve(solver, model.noise_fn, model.schedule, model.schedule.prior(z), t.float(), tp.float(),
                     order=order, cond=c, uc=uc)
        assert close(lat, ours)
        img = pipe(output_type="pt", **kw).images * 2 - 1  # the pipeline's decoder, back to [-1, 1]
        assert close(img, model.decode(ours).clamp(-1, 1), tol=1e-4)


@pytest.mark.parametrize("config", ["sd3_medium", "flux_dev"])
def test_gen_data_and_main_on_a_pipeline_folder(config, sd3_folder, flux_folder, tmp_path):
    """README's commands with the shipped configs, on the tiny folders (sizes and prompts overridden)."""
    import gen_data
    import main as ld3_main

    folder = sd3_folder if config == "sd3_medium" else flux_folder
    common = ["--all_config", str(Path(__file__).resolve().parents[1] / "configs" / f"{config}.yml"),
              "--ckp_path", str(folder), "--prompt_path", str(captions(folder.parent)), "--num_prompts", "3",
              "--H", "16", "--W", "16", "--max_sequence_length", "8", "--threads", "1"]
    data = gen_data.main(common + ["--total_samples", "6", "--sampling_batch_size", "3", "--steps", "8",
                                   "--data_dir", str(tmp_path / "data")])
    assert Path(data).name == "uni_pc_NFE8_sd3_shift_seed0"
    run = ld3_main.main(common + ["--data_dir", str(data), "--num_train", "3", "--num_valid", "3", "--steps", "3",
                                  "--loss_type", "L2", "--main_valid_batch_size", "3", "--training_rounds_v1", "1",
                                  "--training_rounds_v2", "1", "--visualize", "false",
                                  "--log_path", str(tmp_path / "logs")])
    res = json.loads((Path(run) / "result.json").read_text())
    assert len(res["t"]) == 4 and res["t"][0] == pytest.approx(0.999) and all(
        a > b for a, b in zip(res["t"], res["t"][1:]))
    ident = json.loads((Path(run) / "ld3_identity.json").read_text())
    assert ident["model"]["model"] == "diffusers" and "checkpoint_sha256" in ident["model"]


def test_readme_ld3_scheduler_snippet_runs_as_written(sd3_folder, tmp_path):
    """README's LD3Scheduler snippet, verbatim, with a tiny SD3 folder and a run folder."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = text.split("<!-- ld3-scheduler-snippet -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    from ld3.samplers.schedules import FlowSchedule

    t, tp = learned_times(FlowSchedule(), 3)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"best_t_steps": torch.cat([t, tp]).float()}, run / "best_v2.pt")
    (run / "config.yml").write_text("solver_name: uni_pc\norder: 2\n")
    env = {"folder": str(sd3_folder), "run": str(run), "prompt": PROMPTS[:1]}
    exec(compile(code, "README.md", "exec"), env)
    assert len(env["images"]) == 1 and env["pipe"].scheduler.num_inference_steps == 3
