"""Stable Diffusion v1.x: original CompVis checkpoint + v1-inference.yaml, or a local diffusers folder.

Everything runs offline on tiny modules of the same families: a SpatialTransformer U-Net, a KL
autoencoder, a CLIP text encoder built from a CLIPTextConfig, and a CLIP tokenizer made from a
small vocabulary / merges list written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import gen_data
import main as ld3_main
from ld3.config import run_cli
from ld3.models.latent_diffusion import (AutoencoderSpec, UNetSpec, autoencoder_plan, plan_to_compvis, plan_to_diffusers,
                                     read_yaml, unet_plan)
from ld3.models.registry import ModelError, build_model
from tests.test_latent_diffusion import Recorder, _perturb, compvis_alphas

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PROMPTS = ["a cat on a mat", "the red bus", "dog and cat", "a tree near the lake", "ice on the road"]


# --------------------------------------------------------------------------- tiny CLIP files
def write_clip_folder(folder: Path, seed: int = 0):
    """vocab.json / merges.txt / tokenizer files and a CLIPConfig config.json (model_type clip), like
    openai/clip-vit-large-patch14; returns (tokenizer, text encoder with random weights)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "a n", "an d</w>", "c a", "ca t</w>", "o n</w>", "r e", "d o", "do g</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    tok.save_pretrained(str(folder))
    tc = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
                        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                        pad_token_id=vocab["<|endoftext|>"])
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=16, projection_dim=32)
    CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=32).save_pretrained(str(folder))
    torch.manual_seed(seed)
    text = CLIPTextModel(tc).eval().requires_grad_(False)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True), text


# --------------------------------------------------------------------------- tiny SD checkpoint
def sd_params(clip_folder: Path | None) -> dict:
    """v1-inference.yaml in miniature (same options, small widths)."""
    cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    if clip_folder is not None:
        cond["params"] = {"version": str(clip_folder)}
    return {"linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "image_size": 8, "channels": 4,
            "cond_stage_key": "txt", "conditioning_key": "crossattn", "scale_factor": 0.18215, "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                            "params": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                                       "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1, 2],
                                       "num_heads": 2, "use_spatial_transformer": True, "transformer_depth": 1,
                                       "context_dim": 32, "use_checkpoint": True, "legacy": False}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                   "params": {"embed_dim": 4, "ddconfig": {
                                       "double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3,
                                       "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                       "attn_resolutions": [], "dropout": 0.0},
                                       "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": cond}


def write_sd(tmp: Path, name: str = "v1-5-tiny-emaonly.ckpt", seed: int = 0) -> dict:
    clip = tmp / "clip-tiny"
    tok, text = write_clip_folder(clip, seed)
    params = sd_params(clip)
    uspec = UNetSpec.from_params(params["unet_config"]["params"])
    fspec = AutoencoderSpec.from_config(params["first_stage_config"])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = uspec.diffusers_class()(**uspec.diffusers_config()).eval().requires_grad_(False)
    vae = fspec.diffusers_class()(**fspec.diffusers_config(0.18215)).eval().requires_grad_(False)
    _perturb(unet, gen)
    _perturb(vae, gen)
    _perturb(text, gen, 0.02)
    sd = {**plan_to_compvis(unet.state_dict(), unet_plan(uspec), "model.diffusion_model."),
          **plan_to_compvis(vae.state_dict(), autoencoder_plan(fspec), "first_stage_model."),
          **{f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.state_dict().items()},
          "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
          **compvis_alphas(params)}
    ckpt = tmp / "stable-diffusion-v1" / name
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.clone().contiguous() for k, v in sd.items()}}, ckpt)
    cfg = tmp / "v1-inference-tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}))
    prompts = tmp / "captions_val2014.json"
    prompts.write_text(json.dumps({"info": {}, "annotations": [{"image_id": i, "id": 10 + i, "caption": p + " \n"}
                                                               for i, p in enumerate(PROMPTS)]}))
    return {"unet": unet, "vae": vae, "text": text, "tok": tok, "ckpt": ckpt, "yaml": cfg, "prompts": prompts,
            "clip": clip, "uspec": uspec, "fspec": fspec}


def sd_cfg(w: dict, **extra) -> dict:
    return {"model": "conditioned_latent_diff", "ckp_path": str(w["ckpt"]), "config": str(w["yaml"]), "H": 16,
            "W": 16, "C": 4, "f": 2, "scale": 7.5, "use_ema": True, "prompt_path": str(w["prompts"]),
            "num_prompts": 3, **extra}


def _ref_embed(w: dict, prompts: list[str]) -> torch.Tensor:
    ids = w["tok"](prompts, truncation=True, max_length=77, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return w["text"](ids).last_hidden_state


# --------------------------------------------------------------------------- tests
def test_original_checkpoint_loads_exactly(tmp_path):
    w = write_sd(tmp_path)
    model = build_model(sd_cfg(w), CPU)
    assert model.latent_shape == (4, 8, 8) and model.info["img_shape"] == (3, 16, 16) and model.time_mode == "time"
    assert model.net.guidance_scale == 7.5 and isinstance(model.net.guidance_scale, float)
    c, uc = model.conditions([0, 1, 2, 3, 4], seed=0, device="cpu")
    assert c.shape == (5, 77, 32) and uc.shape == (5, 77, 32)
    # prompt of index i = caption i % num_prompts (first 3 captions of the json, in file order)
    assert torch.allclose(c, _ref_embed(w, [PROMPTS[i % 3] for i in range(5)]), atol=1e-6)
    assert torch.allclose(uc, _ref_embed(w, [""] * 5), atol=1e-6), "unconditional input = empty prompt"
    assert torch.equal(c[0], c[3]) and not torch.allclose(c[0], c[1])

    rec = Recorder(model.net.unet)
    model.net.unet = rec
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.9, 0.9])
    with torch.no_grad():
        eps = model.noise_fn(x, t, c[:2], uc[:2])
        ref = w["unet"](torch.cat([x, x]), torch.full((4,), 899.0), encoder_hidden_states=torch.cat([uc[:2], c[:2]])).sample
    assert len(rec.calls) == 1 and torch.equal(rec.calls[0]["c"], torch.cat([uc[:2], c[:2]]))
    assert torch.equal(rec.calls[0]["out"], ref)
    e_uc, e_c = ref.chunk(2)
    assert torch.allclose(eps, e_uc + 7.5 * (e_c - e_uc), atol=1e-6)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.decode(z), w["vae"].decode(z / 0.18215).sample)
    ac = compvis_alphas(sd_params(None))["alphas_cumprod"].double()
    assert torch.allclose(model.schedule.alpha(torch.arange(1, 1001, dtype=torch.float64) / 1000.0) ** 2, ac, rtol=1e-6)


def test_low_gpu_wrapper_gives_the_same_gradients(tmp_path):
    from ld3.student import Rollout, SolverSpec

    w = write_sd(tmp_path)
    grads = []
    for low in (False, True):
        model = build_model(sd_cfg(w, low_gpu=low), CPU)
        c, uc = model.conditions([0, 1], 0, "cpu")
        roll = Rollout(model, SolverSpec("uni_pc", 2, {"variant": "bh2", "lower_order_final": True}), low_gpu=low)
        t = torch.tensor([1.0, 0.6, 0.2, 0.001], requires_grad=True)
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        roll(z, t, c, uc).square().mean().backward()
        grads.append(t.grad.clone())
        assert roll.fn.calls == 3
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_full_size_v1_inference_names():
    """configs/stable-diffusion/v1-inference.yaml at full size (meta device): CompVis names, counts and shapes of
    the real SD v1 files, and diffusers' own conversion code maps them to the same diffusers keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    params = read_yaml(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
    uspec = UNetSpec.from_params(params["unet_config"]["params"])
    fspec = AutoencoderSpec.from_config(params["first_stage_config"])
    with torch.device("meta"):
        unet = uspec.diffusers_class()(**uspec.diffusers_config())
        vae = fspec.diffusers_class()(**fspec.diffusers_config(0.18215))
    cu = plan_to_compvis(unet.state_dict(), unet_plan(uspec), "model.diffusion_model.")
    cf = plan_to_compvis(vae.state_dict(), autoencoder_plan(fspec), "first_stage_model.")
    assert len(cu) == 686 and len(cf) == 248  # tensors of SD v1's U-Net and VAE
    known = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
             "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
             "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
             "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
             "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
             "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
             "model.diffusion_model.time_embed.0.weight": (1280, 320),
             "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
             "first_stage_model.encoder.conv_out.weight": (8, 512, 3, 3),
             "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
             "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
             "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
             "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
             "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1)}
    names = {**cu, **cf}
    for k, shape in known.items():
        assert tuple(names[k].shape) == shape, k
    theirs = convert_ldm_unet_checkpoint(cu, {"layers_per_block": 2})
    assert set(theirs) == set(unet.state_dict())
    vae_theirs = convert_ldm_vae_checkpoint(cf, {"down_block_types": ["DownEncoderBlock2D"] * 4,
                                                 "up_block_types": ["UpDecoderBlock2D"] * 4})
    assert set(vae_theirs) == set(vae.state_dict())
    ours, used, absent = plan_to_diffusers(cu, unet_plan(uspec), "model.diffusion_model.")
    assert not absent and used == set(cu) and all(tuple(ours[k].shape) == tuple(theirs[k].shape) for k in theirs)


def test_diffusers_folder_gives_the_same_model(tmp_path):
    from diffusers import DDIMScheduler

    w = write_sd(tmp_path)
    folder = tmp_path / "stable-diffusion-v1-5-diffusers"
    w["unet"].save_pretrained(str(folder / "unet"))
    w["vae"].save_pretrained(str(folder / "vae"))
    w["text"].save_pretrained(str(folder / "text_encoder"))
    w["tok"].save_pretrained(str(folder / "tokenizer"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    a = build_model(sd_cfg(w), CPU)
    b = build_model(sd_cfg(w, ckp_path=str(folder), config=None), CPU)
    assert a.latent_shape == b.latent_shape and a.info["img_shape"] == b.info["img_shape"]
    ca, ua = a.conditions([0, 1], 0, "cpu")
    cb, ub = b.conditions([0, 1], 0, "cpu")
    assert torch.allclose(ca, cb, atol=1e-6) and torch.allclose(ua, ub, atol=1e-6)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        assert torch.allclose(a.noise_fn(x, t, ca, ua), b.noise_fn(x, t, ca, ua), atol=1e-5)
        assert torch.allclose(a.decode(x), b.decode(x), atol=1e-5)
    tt = torch.linspace(0.001, 1, 50, dtype=torch.float64)
    assert torch.allclose(a.schedule.alpha(tt), b.schedule.alpha(tt), rtol=1e-6)
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(ModelError, match="cannot load the diffusers folder"):
        build_model(sd_cfg(w, ckp_path=str(folder), config=None), CPU)


def _cli(tmp: Path, w: dict, **extra) -> Path:
    cfg = {k: v for k, v in sd_cfg(w).items() if k not in ("prompt_path", "num_prompts")}
    cfg.update({"time_mode": "time", "solver_name": "uni_pc", "unipc_variant": "bh2", "order": 2, "steps": 3, "seed": 0,
                "loss_type": "L2", "threads": 1, "visualize": False, "training_rounds_v1": 1, "training_rounds_v2": 1,
                "main_train_batch_size": 1, "main_valid_batch_size": 3, "num_train": 3, "num_valid": 3,
                "log_path": str(tmp / "logs"), **extra})
    p = tmp / "sd_tiny.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_gen_data_and_main(tmp_path):
    w = write_sd(tmp_path)
    cfg = _cli(tmp_path, w)
    out = Path(gen_data.main(["--all_config", str(cfg), "--total_samples", "6", "--sampling_batch_size", "3",
                              "--steps", "10", "--skip_type", "time_uniform", "--save_pt", "--data_dir",
                              str(tmp_path / "data"), "--prompt_path", str(w["prompts"]), "--num_prompts", "5"]))
    files = sorted(out.glob("latent_*.pt"))
    assert len(files) == 6
    d0, d5 = (torch.load(files[i], weights_only=True) for i in (0, 5))
    assert d0["latent"].shape == (4, 8, 8) and d0["img"].shape == (3, 16, 16)
    assert d0["c"].shape == (77, 32) and d0["uc"].shape == (77, 32) and torch.equal(d0["uc"], d5["uc"])
    assert torch.allclose(d5["c"], _ref_embed(w, [PROMPTS[0]])[0], atol=1e-6), "index 5 -> prompt 5 % 5 = 0"
    # main.py does not need the prompts: c and uc come from the sample files
    run = Path(ld3_main.main(["--all_config", str(cfg), "--data_dir", str(out), "--low_gpu", "true"]))
    hist = json.loads((run / "history.json").read_text())
    first, best = hist[0]["valid_loss"], min(h["best_valid"] for h in hist if "best_valid" in h)
    assert best < first, f"learning did not lower the validation loss ({first} -> {best})"


def test_user_mistakes_are_one_line(tmp_path, capsys):
    w = write_sd(tmp_path)
    argv = ["--total_samples", "2", "--skip_type", "time_uniform", "--save_pt", "--data_dir", str(tmp_path / "d")]
    missing = tmp_path / "pretrained" / "ldm" / "stable-diffusion-v1" / "sd-v1-4.ckpt"
    cases = [({"ckp_path": str(missing)}, [], [str(missing), "bash scripts/download_model.sh sd14"]),
             ({}, [], ["--prompt_path", "bash scripts/download_model.sh coco"]),
             ({}, ["--prompt_path", str(tmp_path / "captions_val2014_missing.json")],
              ["captions_val2014_missing.json", "bash scripts/download_model.sh coco"])]
    for extra, flags, expect in cases:
        assert run_cli(gen_data.main, ["--all_config", str(_cli(tmp_path, w, **extra)), *argv, *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(e in err[0] for e in expect), err
    # tokenizer files absent: the yaml points at an empty folder, no HF cache offline
    params = sd_params(tmp_path / "no-clip-here")
    bad_yaml = tmp_path / "v1-no-clip.yaml"
    bad_yaml.write_text(yaml.safe_dump({"model": {"params": params}}))
    cfg = _cli(tmp_path, w, config=str(bad_yaml))
    rc = run_cli(gen_data.main, ["--all_config", str(cfg), *argv, "--prompt_path", str(w["prompts"])])
    err = capsys.readouterr().err.strip().splitlines()
    if rc == 0:
        pytest.skip("openai/clip-vit-large-patch14 is in the local Hugging Face cache")
    assert rc == 2 and len(err) == 1 and "CLIP tokenizer files" in err[0] and "download_model.sh sd15" in err[0]


def test_v_prediction_folder_converts_to_eps(tmp_path):
    """SD 2.x style: scheduler prediction_type v_prediction. The same U-Net read as a v-prediction gives
    eps = (alpha v + sigma x) / (alpha^2 + sigma^2) of its output (guidance applied first, linear)."""
    from diffusers import DDIMScheduler

    from ld3.models.base import eps_from_v

    w = write_sd(tmp_path)
    folders = {}
    for pred in ("epsilon", "v_prediction"):
        folder = tmp_path / f"sd-{pred}"
        w["unet"].save_pretrained(str(folder / "unet"))
        w["vae"].save_pretrained(str(folder / "vae"))
        w["text"].save_pretrained(str(folder / "text_encoder"))
        w["tok"].save_pretrained(str(folder / "tokenizer"))
        DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type=pred).save_pretrained(str(folder / "scheduler"))
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        folders[pred] = build_model(sd_cfg(w, ckp_path=str(folder), config=None, scale=3.0), CPU)
    e, v = folders["epsilon"], folders["v_prediction"]
    assert v.info["prediction_type"] == "v_prediction"
    c, uc = e.conditions([0, 1], 0, "cpu")
    x, t = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([0.7, 0.2], dtype=torch.float64)
    with torch.no_grad():
        raw = e.noise_fn(x, t, c, uc)  # the guided U-Net output, read as eps
        want = eps_from_v(raw, x, e.schedule.alpha(t), e.schedule.sigma(t))
        got = v.noise_fn(x, t, c, uc)
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, raw, atol=1e-3)
