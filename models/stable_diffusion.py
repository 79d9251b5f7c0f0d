"""Stable Diffusion v1.x: the text side (CLIP tokenizer + text encoder, prompts) and diffusers folders.

Two ways to give the model (config ``model: conditioned_latent_diff``):

- the original CompVis checkpoint (``ckp_path: .../v1-5-pruned-emaonly.ckpt`` or ``sd-v1-4.ckpt``,
  ``config: configs/stable-diffusion/v1-inference.yaml``). U-Net and VAE load through
  ``models/latent_diffusion.py``; the CLIP text encoder's weights come from the checkpoint
  (``cond_stage_model.transformer.*``), but its tokenizer files (``vocab.json``, ``merges.txt``)
  and, preferably, its ``config.json`` must be on disk: ``pretrained/clip-vit-large-patch14/``
  (what ``scripts/download_model.sh sd15`` fetches), a folder named by
  ``cond_stage_config.params.version`` in the yaml, or the Hugging Face cache of
  ``openai/clip-vit-large-patch14``. Nothing is downloaded at run time.
- a local diffusers folder (``ckp_path: path/to/stable-diffusion-v1-5`` with ``model_index.json``,
  ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), read with
  ``local_files_only=True``.

Conditions: the prompt of sample index ``i`` is ``prompts[i % len(prompts)]``, where ``prompts``
are the first ``num_prompts`` captions of ``prompt_path`` (MS-COCO ``captions_val2014.json``:
``annotations[*].caption`` in file order, or a text file with one prompt per line). ``c`` is the
CLIP embedding of the prompt (77 x 768), ``uc`` the embedding of the empty prompt; guidance
``eps_uc + scale (eps_c - eps_uc)`` with the config's ``scale`` (7.5).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn

from ld3.models.latent_diffusion import (LatentDiffusionNet, LDMError, download_hint, make_model, resolve)
from ld3.samplers.schedules import VPDiscreteSchedule

if TYPE_CHECKING:
    from ld3.models.registry import Options

log = logging.getLogger("ld3")

CLIP_VERSION = "openai/clip-vit-large-patch14"
TEXT_PREFIX = "cond_stage_model.transformer."


# --------------------------------------------------------------------------- prompts
def read_prompts(path: str | Path, num_prompts: int | None) -> list[str]:
    """First ``num_prompts`` prompts of an MS-COCO captions json or a text file (one per line)."""
    p = resolve(path)
    if p is None or not p.is_file():
        raise LDMError(f"prompt file {path} not found: fetch MS-COCO captions with `bash scripts/download_model.sh coco` "
                       "(captions_val2014.json), or pass --prompt_path to a .txt file with one prompt per line")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            items = data.get("annotations") if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise ValueError("no 'annotations' list")
            prompts = [str(a["caption"] if isinstance(a, dict) else a).strip() for a in items]
        else:
            prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise LDMError(f"cannot read prompts from {p} ({type(e).__name__}: {e}); expected an MS-COCO captions json "
                       "(annotations: [{caption: ...}]) or a text file with one prompt per line") from None
    if num_prompts is not None and int(num_prompts) > 0:
        if int(num_prompts) > len(prompts):
            log.warning("num_prompts %d > %d prompts in %s: using all of them", int(num_prompts), len(prompts), p)
        prompts = prompts[:int(num_prompts)]
    if not prompts:
        raise LDMError(f"{p} holds no prompts")
    return prompts


class PromptEncoder(nn.Module):
    """CLIP text embeddings (last hidden state, padded to ``max_length``) of prompts, cached per prompt."""

    def __init__(self, tokenizer, text_encoder: nn.Module, max_length: int):
        super().__init__()
        self.tokenizer, self.text_encoder, self.max_length = tokenizer, text_encoder, int(max_length)
        self._cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            ids = self.tokenizer(list(todo), truncation=True, max_length=self.max_length, padding="max_length",
                                 return_tensors="pt").input_ids
            dev = next(self.text_encoder.parameters()).device
            out = self.text_encoder(ids.to(dev)).last_hidden_state.float().cpu()
            for p, e in zip(todo, out):
                self._cache[p] = e
        return torch.stack([self._cache[p] for p in prompts])


def prompt_conditions(encoder: PromptEncoder, prompt_path: str | None, num_prompts: int | None):
    """conditions(indices, seed, device) -> (c, uc): prompt ``i % n`` of the file, and the empty prompt."""
    state: dict[str, Any] = {"prompts": read_prompts(prompt_path, num_prompts) if prompt_path else None}

    def conditions(indices: Sequence[int], seed: int = 0, device: Any = None, balanced: bool = False):
        if state["prompts"] is None:
            from ld3.models.base import ModelError

            raise ModelError("Stable Diffusion needs prompts: pass --prompt_path captions_val2014.json (fetch it with "
                             "`bash scripts/download_model.sh coco`) and --num_prompts N")
        prompts = state["prompts"]
        c = encoder.encode([prompts[int(i) % len(prompts)] for i in indices])
        uc = encoder.encode([""]).expand(len(indices), -1, -1)
        dev = device if device is not None else "cpu"
        return c.to(dev), uc.to(dev)

    conditions.prompts = state  # type: ignore[attr-defined]
    return conditions


# --------------------------------------------------------------------------- CLIP files
def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
                                or (folder / "tokenizer.json").is_file())


def clip_folder_candidates(version: str, yaml_path: Path | None) -> list[Path]:
    name = Path(version).name
    cands = [Path(version).expanduser()]
    if yaml_path is not None:
        cands.append(yaml_path.parent / version)
    cands += [Path("pretrained") / name]
    for sub in ("tokenizer",):
        cands += [c / sub for c in list(cands)]
    seen, out = set(), []
    for c in cands:
        k = str(c.resolve()) if c.exists() else str(c)
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


def find_clip_folder(version: str, yaml_path: Path | None) -> Path | None:
    for c in clip_folder_candidates(version, yaml_path):
        if _has_tokenizer(c):
            return c
    return None


def load_tokenizer(version: str, yaml_path: Path | None):
    from transformers import CLIPTokenizer

    folder = find_clip_folder(version, yaml_path)
    if folder is not None:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True), folder
    try:  # the Hugging Face cache, offline
        return CLIPTokenizer.from_pretrained(version, local_files_only=True), None
    except (OSError, ValueError):
        looked = ", ".join(str(c) for c in clip_folder_candidates(version, yaml_path)[:4])
        raise LDMError(f"CLIP tokenizer files (vocab.json, merges.txt) for {version} not found (looked in {looked} and "
                       "the Hugging Face cache): fetch them with `bash scripts/download_model.sh sd15`") from None


def text_config(folder: Path | None, version: str, text_state: dict[str, Tensor]):
    """CLIPTextConfig: config.json beside the tokenizer, the HF cache, else inferred from the weights (ViT-L/14 text)."""
    from transformers import CLIPTextConfig

    for src in ([str(folder), str(folder.parent)] if folder is not None else []) + [version]:
        try:
            if Path(src).is_dir() and not (Path(src) / "config.json").is_file():
                continue
            return CLIPTextConfig.from_pretrained(src, local_files_only=True)
        except (OSError, ValueError, KeyError):
            continue
    tok = next((v for k, v in text_state.items() if k.endswith("token_embedding.weight")), None)
    pos = next((v for k, v in text_state.items() if k.endswith("position_embedding.weight")), None)
    fc1 = next((v for k, v in text_state.items() if k.endswith("layers.0.mlp.fc1.weight")), None)
    if tok is None or pos is None or fc1 is None:
        raise LDMError("the checkpoint's CLIP text encoder weights are incomplete (token/position embeddings, mlp)")
    layers = {int(k.split("layers.")[1].split(".")[0]) for k in text_state if "encoder.layers." in k}
    hidden = int(tok.shape[1])
    log.info("CLIP text config inferred from the checkpoint (no config.json found): %d layers, width %d", len(layers),
             hidden)
    return CLIPTextConfig(vocab_size=int(tok.shape[0]), hidden_size=hidden, intermediate_size=int(fc1.shape[0]),
                          num_hidden_layers=len(layers), num_attention_heads=max(1, hidden // 64),
                          max_position_embeddings=int(pos.shape[0]), hidden_act="quick_gelu", layer_norm_eps=1e-5,
                          projection_dim=hidden)


def load_text_encoder(text_state: dict[str, Tensor], config) -> nn.Module:
    """CLIPTextModel with the checkpoint's weights (CompVis keys carry an extra ``text_model.`` level)."""
    from transformers import CLIPTextModel

    model = CLIPTextModel(config)
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for k, v in text_state.items():
        for cand in (k, k.removeprefix("text_model."), "text_model." + k):
            if cand in own:
                mapped[cand] = v.float()
                break
        else:
            if not k.endswith("position_ids"):
                raise LDMError(f"CLIP text encoder: checkpoint weight cond_stage_model.transformer.{k} has no place in "
                               "the text model (wrong config.json?)")
    missing = [k for k in own if k not in mapped and not k.endswith("position_ids")]
    if missing:
        raise LDMError(f"CLIP text encoder: the checkpoint lacks {len(missing)} weights (e.g. {missing[0]})")
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise LDMError(f"CLIP text encoder: {bad[0]} has shape {tuple(mapped[bad[0]].shape)} in the checkpoint, "
                       f"{tuple(own[bad[0]].shape)} in the text config")
    model.load_state_dict(mapped, strict=False)
    return model.eval().requires_grad_(False)


def text_side(o: "Options", params: dict, state: dict[str, Tensor], ckp: Path, yaml_path: Path, guidance: float):
    """(prompt encoder module, conditions, info) of a CompVis Stable Diffusion checkpoint."""
    if "prompt_path" not in o:
        raise LDMError(f"{ckp.name} is text-conditioned (Stable Diffusion): use model: conditioned_latent_diff, "
                       "which reads prompt_path and num_prompts")
    cs = params.get("cond_stage_config") or {}
    version = str((cs.get("params") or {}).get("version") or CLIP_VERSION)
    text_state = {k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    if not text_state:
        raise LDMError(f"{ckp} has no {TEXT_PREFIX}* weights (the CLIP text encoder of the config)")
    tokenizer, folder = load_tokenizer(version, yaml_path)
    config = text_config(folder, version, text_state)
    encoder = PromptEncoder(tokenizer, load_text_encoder(text_state, config), config.max_position_embeddings)
    conditions = prompt_conditions(encoder, o.prompt_path, o.num_prompts)
    info = {"clip_files": str(folder) if folder else f"{version} (Hugging Face cache)",
            "prompt_path": o.prompt_path, "num_prompts": o.num_prompts}
    return encoder, conditions, info


# --------------------------------------------------------------------------- diffusers folder
def schedule_from_scheduler_config(folder: Path) -> VPDiscreteSchedule:
    """The VP schedule of a diffusers folder's scheduler config (its ``prediction_type``: see
    :func:`prediction_type`)."""
    p = folder / "scheduler" / "scheduler_config.json"
    try:
        sc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LDMError(f"cannot read {p} ({type(e).__name__}); the diffusers folder is incomplete") from None
    n = int(sc.get("num_train_timesteps", 1000))
    if sc.get("trained_betas"):
        betas = torch.tensor(sc["trained_betas"], dtype=torch.float64)
    elif sc.get("beta_schedule", "linear") == "scaled_linear":
        betas = torch.linspace(float(sc["beta_start"]) ** 0.5, float(sc["beta_end"]) ** 0.5, n, dtype=torch.float64) ** 2
    elif sc.get("beta_schedule", "linear") == "linear":
        betas = torch.linspace(float(sc["beta_start"]), float(sc["beta_end"]), n, dtype=torch.float64)
    else:
        raise LDMError(f"{p}: beta_schedule {sc.get('beta_schedule')!r} is not supported (linear, scaled_linear)")
    if sc.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise LDMError(f"{p}: prediction_type {sc.get('prediction_type')!r} is not supported (epsilon, "
                       "v_prediction)")
    return VPDiscreteSchedule(betas=betas)


def prediction_type(folder: Path) -> str:
    """``epsilon`` or ``v_prediction`` (SD 2.x at 768 px), as the folder's scheduler config says."""
    sc = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return str(sc.get("prediction_type", "epsilon"))


def load_diffusers_folder(o: "Options", folder: Path):
    """``Model`` of a local diffusers Stable Diffusion folder (no network access)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    need = ["model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    lacking = [n for n in need if not (folder / n).exists()]
    if lacking:
        raise LDMError(f"{folder} is not a complete diffusers Stable Diffusion folder (missing {', '.join(lacking)}); "
                       f"or use the original checkpoint: `{download_hint(folder)}`")
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True)
        text = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise LDMError(f"cannot load the diffusers folder {folder}: {str(e).splitlines()[0]}") from None
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    schedule = schedule_from_scheduler_config(folder)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    c = int(unet.config.in_channels)
    if o.f is not None and o.f != f:
        raise LDMError(f"f: {o.f} in the config, but the VAE of {folder} down-samples by {f}")
    if o.C is not None and o.C != c:
        raise LDMError(f"C: {o.C} in the config, but the U-Net of {folder} takes {c} channels")
    side = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    h = o.H if o.H is not None else int(side) * f
    w = o.W if o.W is not None else h
    guidance = o.scale
    encoder = PromptEncoder(tok, text, text.config.max_position_embeddings)
    scale_factor = float(vae.config.scaling_factor)
    net = LatentDiffusionNet(unet, vae, schedule, scale_factor, guidance, cond_encoder=encoder,
                             prediction=prediction_type(folder))
    conditions = prompt_conditions(encoder, o.prompt_path, o.num_prompts)
    info = {"ckp_path": str(folder), "img_shape": (int(vae.config.out_channels), h, w), "scale": guidance,
            "scale_factor": scale_factor, "prompt_path": o.prompt_path, "num_prompts": o.num_prompts,
            "first_stage": "kl", "prediction_type": net.prediction}
    log.info("diffusers folder %s: latent %s, guidance %g", folder, (c, h // f, w // f), guidance)
    return make_model(f"sd:{folder.name}", net, (c, h // f, w // f), conditions, info, o.low_gpu)
