"""Any local diffusers pipeline folder as a ``Model``: ``--model diffusers --ckp_path <folder>``.

The folder's ``model_index.json`` says which pipeline it is; diffusers' own classes load it
(``from_pretrained(..., local_files_only=True)``: offline) and its own ``encode_prompt`` makes the
conditions, so prompts, guidance and latents are what the pipeline would use:

- ``StableDiffusionPipeline`` (SD 1.x, 2.x; epsilon or v-prediction): the U-Net on the VP schedule of
  its scheduler config (``models/stable_diffusion.py``), classifier-free guidance with ``scale``.
- ``StableDiffusionXLPipeline`` (SDXL base): the U-Net with SDXL's added text and size embeddings
  (``time_ids`` = (H, W, 0, 0, H, W), as the pipeline's defaults), classifier-free guidance with ``scale``
  against the pipeline's negative embedding (zeros, ``force_zeros_for_empty_prompt``).
- ``StableDiffusion3Pipeline`` (SD3, SD3.5): the MMDiT's velocity on the rectified-flow schedule,
  network time 1000 t, classifier-free guidance with ``scale`` against the empty prompt.
- ``FluxPipeline`` (FLUX.1 dev / schnell): the velocity on packed 2x2 latent patches, network time t,
  guidance as Flux does it: an embedding of ``scale`` when the transformer has one, no second call.

Velocities become noise predictions in the record (``velocity_noise_fn``), so every solver and the
trainer run unchanged. A condition row is the pipeline's prompt embedding and pooled embedding of one
prompt, flattened into one vector (teacher files store one tensor per sample).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn

from ld3.models.base import Model, ModelError, velocity_noise_fn
from ld3.samplers.schedules import FlowSchedule

if TYPE_CHECKING:
    from ld3.models.registry import Options

log = logging.getLogger("ld3")

FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


def pipeline_class(folder: Path) -> str:
    p = folder / "model_index.json"
    try:
        return str(json.loads(p.read_text())["_class_name"])
    except (OSError, ValueError, KeyError):
        raise ModelError(f"{folder} is not a diffusers pipeline folder (no readable model_index.json with "
                         "_class_name); give the folder that from_pretrained would load") from None


def _read_prompts(o: "Options") -> list[str] | None:
    if not o.prompt_path:
        return None
    from ld3.models.stable_diffusion import read_prompts

    return read_prompts(o.prompt_path, o.num_prompts)


class _Packed:
    """Several per-sample tensors as one flat row per sample, and back."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def pack(self, *parts: Tensor) -> Tensor:
        self.shapes = [tuple(p.shape[1:]) for p in parts]
        return torch.cat([p.reshape(p.shape[0], -1).float() for p in parts], dim=1)

    def unpack(self, row: Tensor) -> list[Tensor]:
        out, k = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(row[:, k:k + n].reshape(row.shape[0], *s))
            k += n
        return out


class FlowPipelineNet(nn.Module):
    """Velocity of an SD3 or Flux transformer at (x, t): x the unpacked latent (C, h, w), t in (0, 1)."""

    def __init__(self, pipe: Any, kind: str, guidance: float, packed: _Packed, height: int, width: int):
        super().__init__()
        self.transformer, self.vae = pipe.transformer, pipe.vae
        self.pipe_cls = type(pipe)
        self.kind, self.guidance, self.packed = kind, float(guidance), packed
        self.height, self.width = height, width
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None, uc: Tensor | None) -> Tensor:
        if cond is None:
            raise ValueError("this pipeline needs a prompt condition (--prompt_path)")
        dtype = next(self.transformer.parameters()).dtype
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        if self.kind == "sd3":
            guided = uc is not None and self.guidance != 1.0
            rows = torch.cat([uc, cond]) if guided else cond
            pe, pp = self.packed.unpack(rows.to(x.device))
            xx = torch.cat([x, x]) if guided else x
            tt = torch.cat([t, t]) if guided else t
            v = self.transformer(hidden_states=xx.to(dtype), timestep=1000 * tt, encoder_hidden_states=pe.to(dtype),
                                 pooled_projections=pp.to(dtype), return_dict=False)[0]
            if guided:
                vu, vc = v.chunk(2)
                v = vu + self.guidance * (vc - vu)
            return v.to(x.dtype)
        b, c, h, w = x.shape  # flux: 2x2 patches of the latent as tokens
        pe, pp, txt_ids = self.packed.unpack(cond.to(x.device))
        tokens = self.pipe_cls._pack_latents(x.to(dtype), b, c, h, w)
        img_ids = self.pipe_cls._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        g = torch.full((b,), self.guidance, device=x.device) if self.transformer.config.guidance_embeds else None
        v = self.transformer(hidden_states=tokens, timestep=t.to(dtype), guidance=g, pooled_projections=pp.to(dtype),
                             encoder_hidden_states=pe.to(dtype), txt_ids=txt_ids[0].to(dtype), img_ids=img_ids,
                             return_dict=False)[0]
        return self.pipe_cls._unpack_latents(v, h * self.vae_scale, w * self.vae_scale, self.vae_scale).to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        cfg = self.vae.config
        dtype = next(self.vae.parameters()).dtype
        z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return self.vae.decode(z.to(dtype)).sample.to(torch.float32)


class SDXLNet(nn.Module):
    """eps of an SDXL U-Net at (x, t) on the VP schedule: added text / size embeddings, guidance."""

    def __init__(self, pipe: Any, schedule: Any, guidance: float, packed: _Packed, time_ids: Tensor, prediction: str):
        super().__init__()
        self.unet, self.vae = pipe.unet, pipe.vae
        self.schedule, self.guidance, self.packed, self.prediction = schedule, float(guidance), packed, prediction
        self.register_buffer("time_ids", time_ids, persistent=False)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None, uc: Tensor | None) -> Tensor:
        from ld3.models.base import eps_from_v

        if cond is None:
            raise ValueError("SDXL needs a prompt condition (--prompt_path)")
        dtype = next(self.unet.parameters()).dtype
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
        t = t.reshape(-1).expand(x.shape[0])
        t_in = self.schedule.model_time(t)
        guided = uc is not None and self.guidance != 1.0
        pe, pp = self.packed.unpack((torch.cat([uc, cond]) if guided else cond).to(x.device))
        xx, tt = (torch.cat([x, x]), torch.cat([t_in, t_in])) if guided else (x, t_in)
        ids = self.time_ids.to(x.device, dtype).expand(xx.shape[0], -1)
        out = self.unet(xx.to(dtype), tt, encoder_hidden_states=pe.to(dtype),
                        added_cond_kwargs={"text_embeds": pp.to(dtype), "time_ids": ids}).sample
        if guided:
            ou, oc = out.chunk(2)
            out = ou + self.guidance * (oc - ou)
        if self.prediction == "v_prediction":
            return eps_from_v(out, x, self.schedule.alpha(t), self.schedule.sigma(t))
        return out.to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode((z / self.vae.config.scaling_factor).to(dtype)).sample.to(torch.float32)


def _load_pipe(folder: Path):
    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[:1] == [None]}  # e.g. SD3 without T5
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **absent)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelError(f"cannot load the diffusers folder {folder}: {str(e).splitlines()[0]}") from None
    for name in ("transformer", "unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.eval().requires_grad_(False)
    return pipe


def _checkpointed(decode, low_gpu: bool):
    def run(z: Tensor) -> Tensor:
        if low_gpu and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(decode, z, use_reentrant=False)
        return decode(z)

    return run


def _sdxl(o: "Options", folder: Path) -> Model:
    from ld3.models.latent_diffusion import LDMError
    from ld3.models.stable_diffusion import prediction_type, schedule_from_scheduler_config

    pipe = _load_pipe(folder)
    try:
        schedule = schedule_from_scheduler_config(folder)
    except LDMError as e:
        raise ModelError(str(e)) from None
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    side = pipe.unet.config.sample_size
    side = int(side if isinstance(side, int) else side[0]) * f
    height, width = o.H or side, o.W or o.H or side
    if height % f or width % f:
        raise ModelError(f"H and W ({height}, {width}) must be multiples of the VAE factor {f}")
    packed = _Packed()
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
    net = SDXLNet(pipe, schedule, o.scale, packed, time_ids, prediction_type(folder))
    prompts = _read_prompts(o)

    def encode(texts: list[str], device: Any) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            pe, npe, pp, npp = pipe.encode_prompt(texts, None, device=torch.device("cpu"), num_images_per_prompt=1,
                                                  do_classifier_free_guidance=True, negative_prompt=None)
        return packed.pack(pe, pp).to(device), packed.pack(npe, npp).to(device)

    def conditions(indices: Sequence[int], seed: int = 0, device: Any = None, balanced: bool = False):
        if prompts is None:
            raise ModelError(f"{folder.name} needs prompts: pass --prompt_path captions.json and --num_prompts N")
        return encode([prompts[int(i) % len(prompts)] for i in indices], device if device is not None else "cpu")

    encode(["shapes"], "cpu")
    latent = (int(pipe.unet.config.in_channels), height // f, width // f)
    info = {"ckp_path": str(folder), "pipeline": type(pipe).__name__, "img_shape": (3, height, width),
            "scale": o.scale, "prompt_path": o.prompt_path, "num_prompts": o.num_prompts,
            "prediction_type": net.prediction}
    log.info("diffusers %s %s: latent %s -> image %s, guidance %g", type(pipe).__name__, folder, latent,
             (3, height, width), o.scale)
    return Model(name=f"sdxl:{folder.name}", noise_fn=net, schedule=schedule, latent_shape=latent,
                 decode=_checkpointed(net.decode, o.low_gpu), conditions=conditions, time_mode="time", net=net,
                 info=info)


def _flow_pipeline(o: "Options", folder: Path, kind: str) -> Model:
    pipe = _load_pipe(folder)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    default = int(getattr(pipe, "default_sample_size", 128)) * vae_scale
    height, width = o.H or default, o.W or o.H or default
    c = int(pipe.transformer.config.in_channels) // (4 if kind == "flux" else 1)
    step = vae_scale * 2  # both transformers see 2x2 latent patches
    if height % step or width % step:
        raise ModelError(f"H and W ({height}, {width}) must be multiples of {step} for {folder.name}")
    latent = (c, height // vae_scale, width // vae_scale)
    packed = _Packed()
    net = FlowPipelineNet(pipe, kind, o.scale, packed, height, width)
    prompts = _read_prompts(o)
    max_len = o.max_sequence_length or (256 if kind == "sd3" else 512)

    def encode(texts: list[str], device: Any) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            if kind == "sd3":
                pe, npe, pp, npp = pipe.encode_prompt(texts, None, None, device=torch.device("cpu"),
                                                      do_classifier_free_guidance=True,
                                                      negative_prompt=[""] * len(texts), max_sequence_length=max_len)
                c_, uc_ = packed.pack(pe, pp), packed.pack(npe, npp)
                return c_.to(device), uc_.to(device)
            pe, pp, ids = pipe.encode_prompt(texts, None, device=torch.device("cpu"), max_sequence_length=max_len)
            return packed.pack(pe, pp, ids.expand(len(texts), *ids.shape)).to(device), None

    def conditions(indices: Sequence[int], seed: int = 0, device: Any = None, balanced: bool = False):
        if prompts is None:
            raise ModelError(f"{folder.name} needs prompts: pass --prompt_path captions.json and --num_prompts N")
        return encode([prompts[int(i) % len(prompts)] for i in indices], device if device is not None else "cpu")

    encode(["shapes"], "cpu")  # the packed layout of a condition row
    schedule = FlowSchedule()
    info = {"ckp_path": str(folder), "pipeline": type(pipe).__name__, "img_shape": (3, height, width),
            "scale": o.scale, "prompt_path": o.prompt_path, "num_prompts": o.num_prompts,
            "image_seq_len": (latent[1] // 2) * (latent[2] // 2), "prediction_type": "flow"}

    decode = _checkpointed(net.decode, o.low_gpu)
    log.info("diffusers %s %s: latent %s -> image %s, guidance %g", type(pipe).__name__, folder, latent,
             (3, height, width), o.scale)
    return Model(name=f"{kind}:{folder.name}", noise_fn=velocity_noise_fn(net.velocity, schedule), schedule=schedule,
                 latent_shape=latent, decode=decode, conditions=conditions, time_mode="time", net=net, info=info)


def load_diffusers_pipeline(o: "Options", device: torch.device) -> Model:
    """``Model`` of a local diffusers pipeline folder (``ckp_path``), whichever pipeline it holds."""
    if not o.ckp_path:
        raise ModelError("--model diffusers needs --ckp_path: a local diffusers pipeline folder")
    folder = Path(o.ckp_path)
    if not folder.is_dir():
        raise ModelError(f"diffusers folder {folder} not found (give the folder that holds model_index.json)")
    cls = pipeline_class(folder)
    if cls == "StableDiffusionPipeline":
        from ld3.models.latent_diffusion import LDMError
        from ld3.models.stable_diffusion import load_diffusers_folder

        try:
            return load_diffusers_folder(o, folder)
        except LDMError as e:
            raise ModelError(str(e)) from None
    if cls == "StableDiffusionXLPipeline":
        return _sdxl(o, folder)
    if cls == "StableDiffusion3Pipeline":
        return _flow_pipeline(o, folder, "sd3")
    if cls == "FluxPipeline":
        return _flow_pipeline(o, folder, "flux")
    raise ModelError(f"{folder}: {cls} is not supported; --model diffusers takes StableDiffusionPipeline (SD 1.x, "
                     "2.x), StableDiffusionXLPipeline, StableDiffusion3Pipeline (SD3, 3.5) and FluxPipeline folders")


__all__ = ["load_diffusers_pipeline", "FlowPipelineNet", "SDXLNet", "pipeline_class", "FLOW_PIPELINES"]
