"""CompVis latent diffusion checkpoints (.ckpt + yaml) through diffusers modules.

The tests write tiny checkpoints in the original on-disk format: a torch pickle whose
``state_dict`` uses CompVis names (``model.diffusion_model.*``, ``model_ema.*``,
``first_stage_model.*``, ``cond_stage_model.*``, ``betas``, ``alphas_cumprod`` ...) next to a
Lightning-style ``callbacks`` entry. They are made from small diffusers modules renamed with
the inverse of the loader's key plan, so the naming is also checked against sources that do
not share that plan: diffusers' own CompVis conversion code, a CompVis-style attention block
written here from the CompVis formulas, and known names/shapes of the real full-size models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import gen_data
import main as ld3_main
from ld3.config import run_cli
from ld3.models.latent_diffusion import (AutoencoderSpec, UNetSpec, autoencoder_plan, plan_to_compvis, plan_to_diffusers,
                                     read_state_dict, read_yaml, unet_plan)
from ld3.models.registry import ModelError, build_model

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- tiny CompVis configs
def vq_first_stage(n_embed: int = 256) -> dict:
    return {"target": "ldm.models.autoencoder.VQModelInterface",
            "params": {"embed_dim": 3, "n_embed": n_embed,
                       "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3,
                                    "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                                    "dropout": 0.0},
                       "lossconfig": {"target": "torch.nn.Identity"}}}


def lsun_params() -> dict:
    """LSUN-like: CompVis AttentionBlock U-Net (4 heads of 16 channels at 64 channels), VQ-f2 first stage."""
    return {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 8, "channels": 3,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                            "params": {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                                       "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
                                       "num_head_channels": 16}},
            "first_stage_config": vq_first_stage(),
            "cond_stage_config": "__is_unconditional__"}


def imagenet_params(n_classes: int = 10) -> dict:
    """cin256-v2-like: SpatialTransformer U-Net on a class embedding (+ null class), VQ-f2 first stage."""
    return {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 8, "channels": 3,
            "cond_stage_key": "class_label", "conditioning_key": "crossattn",
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                            "params": {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                                       "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
                                       "num_heads": 1, "use_spatial_transformer": True, "transformer_depth": 1,
                                       "context_dim": 16}},
            "first_stage_config": vq_first_stage(),
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                  "params": {"n_classes": n_classes + 1, "embed_dim": 16, "key": "class_label"}}}


class FakeModelCheckpoint:
    """Stands for the Lightning callback objects real .ckpt files pickle next to the weights."""

    def __init__(self):
        self.best_model_path = "/somewhere/last.ckpt"


def compvis_alphas(params: dict) -> dict[str, torch.Tensor]:
    """The schedule buffers CompVis' LatentDiffusion registers (float64 math, stored as float32)."""
    n = int(params["timesteps"])
    betas = torch.linspace(params["linear_start"] ** 0.5, params["linear_end"] ** 0.5, n, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    return {"betas": betas.float(), "alphas_cumprod": ac.float(),
            "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]]).float(),
            "sqrt_alphas_cumprod": ac.sqrt().float(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt().float(),
            "posterior_variance": torch.zeros(n), "logvar": torch.zeros(n)}


def _perturb(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.05) -> None:
    """Random offsets on every weight, so norms, biases and zero-initialised layers all matter."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def tiny_modules(params: dict, seed: int = 0) -> dict:
    """Tiny diffusers modules for a CompVis config (what the checkpoint will hold)."""
    uspec = UNetSpec.from_params(params["unet_config"]["params"])
    fspec = AutoencoderSpec.from_config(params["first_stage_config"])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = uspec.diffusers_class()(**uspec.diffusers_config()).eval()
    _perturb(unet, gen)
    ema = uspec.diffusers_class()(**uspec.diffusers_config()).eval()
    ema.load_state_dict(unet.state_dict())
    _perturb(ema, gen, 0.02)
    first = fspec.diffusers_class()(**fspec.diffusers_config(float(params.get("scale_factor", 1.0)))).eval()
    _perturb(first, gen)
    if fspec.kind == "vq":
        with torch.no_grad():  # codebook at the scale of the latents (diffusers' default init is ~0)
            first.quantize.embedding.weight.copy_(torch.randn(first.quantize.embedding.weight.shape, generator=gen))
    out = {"unet": unet, "ema": ema, "first": first, "uspec": uspec, "fspec": fspec}
    cs = params.get("cond_stage_config")
    if isinstance(cs, dict) and cs["target"].endswith("ClassEmbedder"):
        out["class_emb"] = torch.randn(cs["params"]["n_classes"], cs["params"]["embed_dim"], generator=gen)
    for m in (unet, ema, first):
        m.requires_grad_(False)
    return out


def compvis_state_dict(mods: dict, params: dict, first_stage: bool = True) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    sd.update(plan_to_compvis(mods["unet"].state_dict(), unet_plan(mods["uspec"]), "model.diffusion_model."))
    ema = plan_to_compvis(mods["ema"].state_dict(), unet_plan(mods["uspec"]), "model.diffusion_model.")
    sd.update({"model_ema." + "".join(k.split(".")[1:]): v for k, v in ema.items()})
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1234)
    if first_stage:
        sd.update(plan_to_compvis(mods["first"].state_dict(), autoencoder_plan(mods["fspec"]), "first_stage_model."))
        sd["first_stage_model.loss.logvar"] = torch.zeros(())  # training-only weights real VQ files carry
    if "class_emb" in mods:
        sd["cond_stage_model.embedding.weight"] = mods["class_emb"]
    sd.update(compvis_alphas(params))
    return {k: v.clone().contiguous() for k, v in sd.items()}


def write_checkpoint(tmp: Path, name: str, params: dict, seed: int = 0, first_stage: bool = True) -> dict:
    """Write ``{name}/model.ckpt`` (CompVis format) and ``{name}.yaml``; return paths and the reference modules."""
    mods = tiny_modules(params, seed)
    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "model.ckpt"
    torch.save({"state_dict": compvis_state_dict(mods, params, first_stage), "global_step": 7, "epoch": 0,
                "pytorch-lightning_version": "1.4.2", "callbacks": {"ModelCheckpoint": FakeModelCheckpoint()}}, ckpt)
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}))
    return {**mods, "ckpt": ckpt, "yaml": cfg}


def model_cfg(w: dict, **extra) -> dict:
    return {"model": "latent_diff", "ckp_path": str(w["ckpt"]), "config": str(w["yaml"]), "H": 16, "W": 16, "C": 3,
            "f": 2, "use_ema": False, "scale": 1.0, **extra}


# --------------------------------------------------------------------------- loading
def test_checkpoint_format_and_exact_outputs(tmp_path):
    w = write_checkpoint(tmp_path, "lsun_tiny", lsun_params())
    with pytest.raises(Exception):  # a Lightning-style file: weights_only loading alone refuses it
        torch.load(w["ckpt"], weights_only=True)
    sd = read_state_dict(w["ckpt"])
    assert "model.diffusion_model.input_blocks.3.1.qkv.weight" in sd  # CompVis AttentionBlock, fused qkv
    assert sd["model.diffusion_model.input_blocks.3.1.qkv.weight"].shape == (192, 64, 1)

    model = build_model(model_cfg(w), CPU)
    assert model.latent_shape == (3, 8, 8) and model.info["img_shape"] == (3, 16, 16) and model.time_mode == "time"
    assert model.conditions([0, 1], 0, "cpu") == (None, None)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=gen)
    t = torch.tensor([1.0, 0.5, 0.001])
    with torch.no_grad():
        eps = model.noise_fn(x, t, None, None)
        ref = w["unet"](x, model.schedule.model_time(t)).sample
        assert torch.equal(eps, ref)
        assert torch.equal(model.schedule.model_time(t), torch.tensor([999.0, 499.0, 0.0]))
        z = torch.randn(2, 3, 8, 8, generator=gen)
        img = model.decode(z)
        assert img.shape == (2, 3, 16, 16) and torch.equal(img, w["first"].decode(z).sample)
    # gradients reach t (params2 of LD3) and the latent through the (straight-through) quantizer
    tt = torch.tensor([0.7], requires_grad=True)
    zz = torch.randn(1, 3, 8, 8, generator=gen, requires_grad=True)
    model.decode(model.noise_fn(zz, tt, None, None)).square().sum().backward()
    assert tt.grad is not None and tt.grad.abs() > 0 and zz.grad is not None and zz.grad.abs().sum() > 0


def test_schedule_matches_alphas_cumprod(tmp_path):
    w = write_checkpoint(tmp_path, "lsun_tiny", lsun_params())
    model = build_model(model_cfg(w), CPU)
    ac = compvis_alphas(lsun_params())["alphas_cumprod"].double()
    n = torch.arange(1, 1001, dtype=torch.float64)
    tn = n / 1000
    sch = model.schedule
    assert sch.T == 1.0 and sch.t_min == 1e-3 and sch.N == 1000
    assert torch.allclose(sch.alpha(tn) ** 2, ac, rtol=1e-6, atol=0)
    assert torch.allclose(sch.model_time(tn), n - 1, atol=1e-9)
    assert torch.allclose(sch.alpha(tn) ** 2 + sch.sigma(tn) ** 2, torch.ones(1000, dtype=torch.float64))


def test_use_ema_takes_the_model_ema_weights(tmp_path):
    w = write_checkpoint(tmp_path, "lsun_tiny", lsun_params())
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([0.3, 0.9])
    main = build_model(model_cfg(w, use_ema=False), CPU)
    ema = build_model(model_cfg(w, use_ema=True), CPU)
    with torch.no_grad():
        tin = main.schedule.model_time(t)
        assert torch.equal(main.noise_fn(x, t), w["unet"](x, tin).sample)
        assert torch.equal(ema.noise_fn(x, t), w["ema"](x, tin).sample)
        assert not torch.allclose(main.noise_fn(x, t), ema.noise_fn(x, t))


def test_first_stage_from_its_own_checkpoint(tmp_path):
    """LSUN's LDM file may lack first_stage_model.*: the yaml's first_stage ckpt_path (VQ-f4 file) is used."""
    params = lsun_params()
    vq_file = tmp_path / "first_stage_models" / "vq-tiny" / "model.ckpt"
    params["first_stage_config"]["params"]["ckpt_path"] = str(vq_file)
    w = write_checkpoint(tmp_path, "lsun_nofs", params, first_stage=False)
    cfg = model_cfg(w)
    with pytest.raises(ModelError, match="first-stage checkpoint .*vq-tiny.*bash scripts/download_model.sh lsun"):
        build_model(cfg, CPU)
    vq_file.parent.mkdir(parents=True)
    vq_sd = plan_to_compvis(w["first"].state_dict(), autoencoder_plan(w["fspec"]))
    torch.save({"state_dict": {**vq_sd, "loss.discriminator.main.0.weight": torch.zeros(1)}}, vq_file)
    model = build_model(cfg, CPU)
    z = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.decode(z), w["first"].decode(z).sample)


# --------------------------------------------------------------------------- naming checks independent of the plan
def test_plan_agrees_with_diffusers_conversion_code(tmp_path):
    """diffusers' own CompVis -> diffusers conversion (single_file_utils) gives the same weights as our plan."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for params, full in ((imagenet_params(), True), (lsun_params(), False)):
        mods = tiny_modules(params)
        sd = compvis_state_dict(mods, params)
        ours, _, _ = plan_to_diffusers(sd, unet_plan(mods["uspec"]), "model.diffusion_model.")
        theirs = convert_ldm_unet_checkpoint(sd, {"layers_per_block": 1})
        assert set(ours) == set(mods["unet"].state_dict())
        if full:  # SpatialTransformer U-Net: every key
            assert set(theirs) == set(ours)
        else:  # CompVis AttentionBlocks keep their own leaf names in diffusers' code: compare everything else
            theirs = {k: v for k, v in theirs.items() if ".attentions." not in k}
            assert set(theirs) == {k for k in ours if ".attentions." not in k}
        for k in theirs:
            assert torch.equal(theirs[k], ours[k]), k
        vae_ours, _, _ = plan_to_diffusers(sd, autoencoder_plan(mods["fspec"]), "first_stage_model.")
        vae_theirs = convert_ldm_vae_checkpoint(sd, {"down_block_types": ["DownEncoderBlock2D"] * 2,
                                                     "up_block_types": ["UpDecoderBlock2D"] * 2})
        assert set(vae_theirs) == set(vae_ours) - {"quantize.embedding.weight"}
        for k in vae_theirs:
            assert torch.equal(vae_theirs[k], vae_ours[k]), k


def _compvis_attention_block(x: torch.Tensor, w: dict, heads: int) -> torch.Tensor:
    """openaimodel.AttentionBlock with QKVAttentionLegacy, from the CompVis formulas (not from our plan)."""
    b, c, *spatial = x.shape
    xf = x.reshape(b, c, -1)
    qkv = F.conv1d(F.group_norm(xf, 32, w["norm.weight"], w["norm.bias"], eps=1e-5), w["qkv.weight"], w["qkv.bias"])
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)
    h = F.conv1d(a, w["proj_out.weight"], w["proj_out.bias"])
    return (xf + h).reshape(b, c, *spatial)


def _compvis_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_legacy_attention_and_time_embedding_match_compvis_formulas(tmp_path):
    w = write_checkpoint(tmp_path, "lsun_tiny", lsun_params())
    model = build_model(model_cfg(w), CPU)
    sd = read_state_dict(w["ckpt"])
    unet = model.net.unet
    x = torch.randn(2, 64, 4, 4)
    for cv, module in (("input_blocks.3.1", unet.down_blocks[1].attentions[0]),
                       ("middle_block.1", unet.mid_block.attentions[0]),
                       ("output_blocks.1.1", unet.up_blocks[0].attentions[1])):
        weights = {k.split(cv + ".")[1]: v for k, v in sd.items() if k.startswith(f"model.diffusion_model.{cv}.")}
        with torch.no_grad():
            assert torch.allclose(module(x), _compvis_attention_block(x, weights, heads=4), atol=1e-5), cv
    t = torch.tensor([0.0, 17.5, 999.0])
    assert torch.allclose(unet.time_proj(t), _compvis_timestep_embedding(t, 32), atol=1e-5)


def _meta_compvis_names(yaml_path: Path) -> tuple[dict, UNetSpec, AutoencoderSpec, dict]:
    params = read_yaml(yaml_path)
    uspec = UNetSpec.from_params(params["unet_config"]["params"])
    fspec = AutoencoderSpec.from_config(params["first_stage_config"])
    with torch.device("meta"):
        unet = uspec.diffusers_class()(**uspec.diffusers_config())
        first = fspec.diffusers_class()(**fspec.diffusers_config())
    names = {**plan_to_compvis(unet.state_dict(), unet_plan(uspec), "model.diffusion_model."),
             **plan_to_compvis(first.state_dict(), autoencoder_plan(fspec), "first_stage_model.")}
    return names, uspec, fspec, unet.state_dict()


@pytest.mark.parametrize("yaml_name,known", [
    ("latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml", {
        "model.diffusion_model.input_blocks.0.0.weight": (224, 3, 3, 3),
        "model.diffusion_model.input_blocks.4.1.qkv.weight": (1344, 448, 1),
        "model.diffusion_model.input_blocks.4.1.proj_out.weight": (448, 448, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (224, 224, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (448, 224, 1, 1),
        "model.diffusion_model.middle_block.1.norm.weight": (896,),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (896, 896, 3, 3),
        "model.diffusion_model.output_blocks.11.0.in_layers.2.weight": (224, 448, 3, 3),
        "model.diffusion_model.time_embed.2.weight": (896, 896),
        "model.diffusion_model.out.2.weight": (3, 224, 3, 3),
        "first_stage_model.quantize.embedding.weight": (8192, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.decoder.up.2.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.post_quant_conv.weight": (3, 3, 1, 1)}),
    ("latent-diffusion/cin256-v2.yaml", {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (384, 512),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (384, 384, 1, 1),
        "model.diffusion_model.input_blocks.10.1.transformer_blocks.0.ff.net.0.proj.weight": (7680, 960),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.weight": (960, 960),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (384, 384, 3, 3),
        "first_stage_model.quant_conv.weight": (3, 3, 1, 1)}),
])
def test_full_size_configs_use_compvis_names(yaml_name, known):
    """The shipped yamls, built at full size on the meta device: weight names/shapes as in the real files."""
    names, uspec, _, df_state = _meta_compvis_names(ROOT / "configs" / yaml_name)
    for k, shape in known.items():
        assert k in names, k
        assert tuple(names[k].shape) == shape, (k, tuple(names[k].shape))
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    theirs = convert_ldm_unet_checkpoint({k: v for k, v in names.items() if k.startswith("model.diffusion_model.")},
                                         {"layers_per_block": uspec.num_res_blocks})
    keep = (lambda k: True) if uspec.spatial_transformer else (lambda k: ".attentions." not in k)
    assert {k for k in theirs if keep(k)} == {k for k in df_state if keep(k)}


# --------------------------------------------------------------------------- ImageNet: conditions and guidance
class Recorder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    @property
    def config(self):
        return self.inner.config

    def forward(self, x, t, encoder_hidden_states=None):
        out = self.inner(x, t, encoder_hidden_states=encoder_hidden_states)
        self.calls.append({"x": x, "t": t, "c": encoder_hidden_states, "out": out.sample})
        return out


def test_imagenet_conditions_and_guidance_reach_the_network(tmp_path):
    w = write_checkpoint(tmp_path, "cin_tiny", imagenet_params())
    model = build_model(model_cfg(w, model="conditioned_latent_diff", scale=2.0), CPU)
    emb = w["class_emb"]
    assert model.info["null_class"] == 10 and model.info["scale"] == 2.0
    c, uc = model.conditions([0, 1, 2, 3], seed=0, device="cpu")
    assert c.shape == (4, 1, 16) and uc.shape == (4, 1, 16)
    assert torch.equal(uc, emb[10].expand(4, 1, 16)), "unconditional input = embedding of the null class"
    labels = [int(torch.nonzero((emb[:10] == row).all(1))[0]) for row in c[:, 0]]
    c2, _ = model.conditions([3, 1], seed=0, device="cpu")
    assert torch.equal(c2, c[[3, 1]]), "labels depend on the sample index only"
    assert not torch.equal(model.conditions([0, 1, 2, 3], seed=1, device="cpu")[0], c) or len(set(labels)) == 1
    cb, _ = model.conditions(list(range(20)), seed=0, device="cpu", balanced=True)
    assert torch.equal(cb[:, 0], emb[torch.arange(20) % 10]), "balanced: uniform over classes"

    rec = Recorder(model.net.unet)
    model.net.unet = rec
    x = torch.randn(4, 3, 8, 8)
    t = torch.full((4,), 0.6)
    with torch.no_grad():
        eps = model.noise_fn(x, t, c, uc)
    assert len(rec.calls) == 1, "guidance uses one network call on the batch [uc; c]"
    call = rec.calls[0]
    assert torch.equal(call["x"], torch.cat([x, x])) and torch.equal(call["c"], torch.cat([uc, c]))
    assert torch.allclose(call["t"], torch.full((8,), 599.0))
    e_uc, e_c = call["out"].chunk(2)
    assert torch.allclose(eps, e_uc + 2.0 * (e_c - e_uc), atol=1e-6)
    assert not torch.allclose(e_uc, e_c), "the class embedding must change the output"

    one = build_model(model_cfg(w, model="conditioned_latent_diff", scale=1.0), CPU)
    c1, uc1 = one.conditions([0], seed=0, device="cpu")
    assert uc1 is None
    one.net.unet = Recorder(one.net.unet)
    with torch.no_grad():
        one.noise_fn(x[:1], t[:1], c1, uc1)
    assert one.net.unet.calls[0]["x"].shape[0] == 1


# --------------------------------------------------------------------------- the command-line tools
def _cli_config(tmp: Path, w: dict, name: str, **extra) -> Path:
    # 8 optimizer steps in all: validate after each (the default, every 10, would leave only the
    # round-start checks, whose outcome then hangs on float rounding in a latent move)
    cfg = {"model": "latent_diff", "ckp_path": str(w["ckpt"]), "config": str(w["yaml"]), "H": 16, "W": 16, "C": 3,
           "f": 2, "scale": 0.0, "use_ema": False, "time_mode": "time", "solver_name": "uni_pc", "unipc_variant": "bh2",
           "order": 3, "steps": 4, "seed": 0, "loss_type": "L2", "threads": 1, "visualize": False,
           "training_rounds_v1": 1, "training_rounds_v2": 1, "main_train_batch_size": 1, "main_valid_batch_size": 4,
           "num_train": 4, "num_valid": 4, "valid_every": 1, "log_path": str(tmp / "logs" / name), **extra}
    p = tmp / f"{name}.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _gen(cfg: Path, tmp: Path, n: int = 8, *extra: str) -> Path:
    return Path(gen_data.main(["--all_config", str(cfg), "--total_samples", str(n), "--sampling_batch_size", "4",
                               "--steps", "12", "--skip_type", "time_uniform", "--save_pt",
                               "--data_dir", str(tmp / "data"), *extra]))


def _learned(run: Path) -> tuple[float, float]:
    hist = json.loads((run / "history.json").read_text())
    return hist[0]["valid_loss"], min(h["best_valid"] for h in hist if "best_valid" in h)


def test_gen_data_and_main_lsun(tmp_path):
    w = write_checkpoint(tmp_path, "lsun_tiny", lsun_params())
    cfg = _cli_config(tmp_path, w, "lsun")
    out = _gen(cfg, tmp_path)
    files = sorted(out.glob("latent_*.pt"))
    assert out.name == "uni_pc_NFE12_time_uniform_seed0" and len(files) == 8
    d = torch.load(files[0], weights_only=True)
    assert d["latent"].shape == (3, 8, 8) and d["img"].shape == (3, 16, 16) and d["c"] is None and d["uc"] is None
    assert torch.isfinite(d["img"]).all() and d["img"].std() > 0.01  # not clamped, as the paper writes it
    run = Path(ld3_main.main(["--all_config", str(cfg), "--data_dir", str(out), "--low_gpu", "true"]))
    first, best = _learned(run)
    assert best < first, f"learning did not lower the validation loss ({first} -> {best})"


def test_gen_data_and_main_imagenet(tmp_path):
    w = write_checkpoint(tmp_path, "cin_tiny", imagenet_params())
    cfg = _cli_config(tmp_path, w, "cin", model="conditioned_latent_diff", scale=2.0)
    out = _gen(cfg, tmp_path)
    d = torch.load(sorted(out.glob("latent_*.pt"))[5], weights_only=True)
    assert d["c"].shape == (1, 16) and torch.equal(d["uc"], w["class_emb"][10][None])
    assert d["img"].shape == (3, 16, 16)
    run = Path(ld3_main.main(["--all_config", str(cfg), "--data_dir", str(out)]))
    first, best = _learned(run)
    assert best < first, f"learning did not lower the validation loss ({first} -> {best})"


def test_missing_checkpoint_or_config_is_one_line(tmp_path, capsys):
    w = write_checkpoint(tmp_path, "lsun_tiny", lsun_params())
    missing = tmp_path / "pretrained" / "ldm" / "lsun_beds256" / "model.ckpt"
    argv = ["--total_samples", "2", "--skip_type", "time_uniform", "--data_dir", str(tmp_path / "d")]
    for extra, expect in (({"ckp_path": str(missing)}, [str(missing), "bash scripts/download_model.sh lsun"]),
                          ({"ckp_path": str(tmp_path / "ldm" / "cin256-v2" / "model.ckpt"),
                            "model": "conditioned_latent_diff"}, ["cin256-v2", "bash scripts/download_model.sh imagenet"]),
                          ({"config": str(tmp_path / "nope.yaml")}, ["nope.yaml", "configs/latent-diffusion"])):
        cfg = _cli_config(tmp_path, w, "bad", **extra)
        assert run_cli(gen_data.main, ["--all_config", str(cfg), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(e in err[0] for e in expect), err

    # a file that is not a checkpoint (an HTML error page saved under the right name)
    missing.parent.mkdir(parents=True)
    missing.write_text("<html>403 Forbidden</html>")
    cfg = _cli_config(tmp_path, w, "bad", ckp_path=str(missing))
    assert run_cli(gen_data.main, ["--all_config", str(cfg), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "bash scripts/download_model.sh lsun" in err[0], err

    # a yaml that does not describe the checkpoint: one line naming the mismatch
    params = lsun_params()
    params["unet_config"]["params"]["num_res_blocks"] = 2
    bad_yaml = tmp_path / "wrong.yaml"
    bad_yaml.write_text(yaml.safe_dump({"model": {"params": params}}))
    cfg = _cli_config(tmp_path, w, "bad", config=str(bad_yaml))
    assert run_cli(gen_data.main, ["--all_config", str(cfg), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match" in err[0]


# --------------------------------------------------------------------------- low_gpu
def _training_step_memory(model, low_gpu: bool, steps: int = 6) -> tuple[int, int]:
    """(peak allocated bytes, bytes autograd keeps for backward) of one LD3 training step on the CPU.

    The step is the student rollout (uni_pc, ``steps`` NFE) + decoding + an L2 loss + backward,
    as in main.py. Peak: allocations and frees recorded by torch.profiler, summed in time order.
    Saved: storages handed to autograd outside checkpointed regions (saved_tensors_hooks).
    """
    from torch.profiler import ProfilerActivity, profile

    from ld3.student import Rollout, SolverSpec
    from ld3.models.latent_diffusion import checkpointed_decode

    model.decode = checkpointed_decode(model.net, low_gpu)
    roll = Rollout(model, SolverSpec("uni_pc", 3, {"variant": "bh2", "lower_order_final": True}), low_gpu=low_gpu)
    t = torch.linspace(1.0, 1e-3, steps + 1, dtype=torch.float32).requires_grad_(True)
    z = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    seen: dict[int, int] = {}

    def pack(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = roll(z, t).square().mean()
        loss.backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and z.grad is not None
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak, sum(seen.values())


def test_low_gpu_checkpointing_lowers_peak_memory(tmp_path, capsys):
    w = write_checkpoint(tmp_path, "lsun_tiny", lsun_params())
    model = build_model(model_cfg(w), CPU)
    peak_full, saved_full = _training_step_memory(model, low_gpu=False)
    peak_ckpt, saved_ckpt = _training_step_memory(model, low_gpu=True)
    with capsys.disabled():
        print(f"\n[low_gpu] one training step (uni_pc 6 NFE, batch 2, 3x8x8 latent -> 16x16 image): peak allocated "
              f"{peak_full / 1e6:.2f} MB -> {peak_ckpt / 1e6:.2f} MB (ratio {peak_ckpt / peak_full:.2f}); "
              f"saved activations {saved_full / 1e6:.2f} MB -> {saved_ckpt / 1e6:.3f} MB")
    assert peak_ckpt < 0.6 * peak_full
    assert saved_ckpt < 0.1 * saved_full


# --------------------------------------------------------------------------- the paper's configs
@pytest.mark.parametrize("name,target,latent,img", [
    ("latent_diff_LSUN", "lsun", (3, 64, 64), (3, 256, 256)),
    ("latent_diff_imn", "imagenet", (3, 64, 64), (3, 256, 256)),
    ("stable_diff_v1-4", "sd14", (4, 64, 64), (3, 512, 512)),
    ("stable_diff_v1-5", "sd15", (4, 64, 64), (3, 512, 512)),
])
def test_paper_configs_use_the_shipped_yamls(name, target, latent, img, tmp_path, monkeypatch):
    from ld3.models.latent_diffusion import shapes

    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yml").read_text())
    params = read_yaml(ROOT / cfg["config"])
    uspec = UNetSpec.from_params(params["unet_config"]["params"])
    fspec = AutoencoderSpec.from_config(params["first_stage_config"])
    from ld3.models.registry import get_family

    assert shapes(get_family(cfg["model"]).read(cfg), params, uspec, fspec) == (latent, img)
    monkeypatch.chdir(tmp_path)  # checkpoints are not in the repository: the error names file and command
    if (ROOT / cfg["ckp_path"]).exists():
        pytest.skip(f"{cfg['ckp_path']} is present")
    with pytest.raises(ModelError) as e:
        build_model(cfg, CPU)
    assert cfg["ckp_path"] in str(e.value) and f"bash scripts/download_model.sh {target}" in str(e.value)
