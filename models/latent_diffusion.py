"""CompVis latent diffusion checkpoints (``.ckpt`` + original yaml) run through diffusers modules.

Covers the paper's latent models: LSUN bedrooms (VQ-f4 first stage, unconditional), class-
conditional ImageNet 256 (``cin256-v2``, classifier-free guidance with the null class) and, with
``models/stable_diffusion.py`` for the text side, Stable Diffusion v1.x. No CompVis code is used:

- the yaml (``model.params``) gives the architecture: ``unet_config``, ``first_stage_config``,
  ``cond_stage_config``, ``scale_factor``, the beta schedule;
- the checkpoint is a torch pickle with ``state_dict`` (keys ``model.diffusion_model.*``,
  ``model_ema.*``, ``first_stage_model.*``, ``cond_stage_model.*``, ``betas``,
  ``alphas_cumprod`` ...); it is read with ``weights_only=True``, or, for Lightning files that
  also pickle callback objects, with an unpickler that turns every unknown class into an inert
  stub (nothing from the file is executed);
- the network is a diffusers ``UNet2DModel`` (CompVis ``AttentionBlock`` U-Nets such as LSUN)
  or ``UNet2DConditionModel`` (``SpatialTransformer`` U-Nets: ImageNet, Stable Diffusion); the
  first stage a diffusers ``VQModel`` or ``AutoencoderKL``;
- weights are renamed by a key plan (``unet_plan`` / ``autoencoder_plan``): one row per module,
  ``(CompVis prefix, diffusers prefix, kind)``, where ``kind`` says how the leaf names inside
  change (ResBlock ``in_layers.0`` -> ``norm1`` ..., a legacy attention's fused ``qkv`` conv ->
  ``to_q/to_k/to_v`` split per head, 1x1 convs -> linear weights). The same plan converts back
  (``plan_to_compvis``), which the tests use to write tiny checkpoints; the tests also compare
  the plan with diffusers' own conversion code (``diffusers.loaders.single_file_utils``).

The ``Model`` integrates the latent with the VP discrete schedule of the checkpoint's
``alphas_cumprod`` (network time input ``N (t - 1/N)``), predicts noise, and decodes through the
first stage (``z / scale_factor`` then the decoder; VQ latents are quantized first, as
CompVis' ``decode_first_stage``). Clamping to [-1, 1] is left to the caller.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import yaml
from torch import Tensor, nn

from ld3.models.base import Model, eps_from_v, index_generator
from ld3.resources import shipped
from ld3.samplers.schedules import VPDiscreteSchedule

if TYPE_CHECKING:
    from ld3.models.registry import Options

log = logging.getLogger("ld3")

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."


class LDMError(Exception):
    """A latent diffusion checkpoint / config cannot be used (message is one line for the user)."""


# --------------------------------------------------------------------------- files
def resolve(path: str | Path | None) -> Path | None:
    """``path`` as given (relative to the working directory) if it exists, else the packaged copy of a
    ``configs/...`` file (the paper's configs name ``configs/latent-diffusion/*.yaml``)."""
    if path in (None, ""):
        return None
    p = Path(str(path)).expanduser()
    if p.exists() or p.is_absolute():
        return p
    return shipped(p) or p


def download_name(path: str | Path | None, yaml_cfg: dict | None = None) -> str:
    """The ``scripts/download_model.sh`` target for a latent checkpoint (guessed from its path)."""
    s = str(path or "").lower()
    for key, name in (("lsun", "lsun"), ("bedroom", "lsun"), ("cin", "imagenet"), ("imagenet", "imagenet"),
                      ("v1-4", "sd14"), ("v1_4", "sd14"), ("v1-5", "sd15"), ("v1_5", "sd15")):
        if key in s:
            return name
    target = str(((yaml_cfg or {}).get("cond_stage_config") or {}).get("target", "")) if isinstance(
        (yaml_cfg or {}).get("cond_stage_config"), dict) else ""
    if target.endswith("ClassEmbedder"):
        return "imagenet"
    if "CLIP" in target:
        return "sd15"
    return "lsun"


def download_hint(path: str | Path | None, yaml_cfg: dict | None = None) -> str:
    return f"bash scripts/download_model.sh {download_name(path, yaml_cfg)}"


_SAFE_TORCH_UTILS = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy",
                     "_rebuild_meta_tensor_no_storage", "_rebuild_qtensor"}


class _Stub:
    """Stand-in for a class a Lightning checkpoint pickles besides its weights (never executed)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


class _StubUnpickler(pickle.Unpickler):
    """Tensors, containers and numbers as usual; any other class becomes an inert ``_Stub``."""

    def find_class(self, module: str, name: str) -> Any:
        import collections

        if module == "collections" and name in ("OrderedDict", "defaultdict"):
            return getattr(collections, name)
        if module == "torch._utils" and name in _SAFE_TORCH_UTILS:
            import torch._utils as tu

            return getattr(tu, name)
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            import torch._tensor as tt

            return tt._rebuild_from_type_v2
        if module == "torch" and (isinstance(getattr(torch, name, None), torch.dtype)
                                  or name in ("Size", "device", "Tensor") or name.endswith("Storage")):
            return getattr(torch, name)
        if module == "torch.nn.parameter" and name == "Parameter":
            return nn.Parameter
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "slice", "complex", "object",
                                                              "bytearray", "tuple", "list", "dict"):
            import builtins

            return getattr(builtins, name)
        if module == "_codecs" and name == "encode":
            import codecs

            return codecs.encode
        if module.split(".")[0] == "numpy" and name in ("_reconstruct", "scalar", "ndarray", "dtype"):
            import numpy as np

            if name in ("ndarray", "dtype"):
                return getattr(np, name)
            try:
                from numpy._core import multiarray
            except ImportError:  # numpy < 2
                from numpy.core import multiarray
            return getattr(multiarray, name)
        return type(name, (_Stub,), {"__module__": f"ld3_stub.{module}"})


class _StubPickleModule:
    """``pickle_module`` for ``torch.load``: restricted unpickling of Lightning checkpoints."""

    Unpickler = _StubUnpickler
    __name__ = "ld3_stub_pickle"

    @staticmethod
    def load(f, **kw):
        return _StubUnpickler(f, **kw).load()


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """State dict of a CompVis checkpoint (``.ckpt`` torch pickle with 'state_dict', or ``.safetensors``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise LDMError(f"{path} is not a readable safetensors file ({type(e).__name__})") from None
    obj = None
    errors = []
    for kwargs in (dict(weights_only=True, mmap=True), dict(weights_only=True),
                   dict(weights_only=False, pickle_module=_StubPickleModule, mmap=True),
                   dict(weights_only=False, pickle_module=_StubPickleModule)):
        try:
            obj = torch.load(str(path), map_location="cpu", **kwargs)
            break
        except Exception as e:  # noqa: BLE001 - try the next reading mode, report all if none works
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160])
    if obj is None:
        raise LDMError(f"{path} is not a readable torch checkpoint ({errors[-1]})")
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(isinstance(v, Tensor) for v in sd.values()):
        raise LDMError(f"{path} holds no state_dict of tensors")
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


def read_yaml(path: str | Path) -> dict:
    """``model.params`` of a CompVis yaml config."""
    path = Path(path)
    try:
        y = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise LDMError(f"cannot read model config {path}: {str(e).splitlines()[0]}") from None
    params = ((y or {}).get("model") or {}).get("params") if isinstance(y, dict) else None
    if not isinstance(params, dict) or "unet_config" not in params or "first_stage_config" not in params:
        raise LDMError(f"model config {path} is not a CompVis latent diffusion yaml (needs model.params."
                       "unet_config and first_stage_config)")
    return params


# --------------------------------------------------------------------------- key plans
Plan = list[tuple[str, str, str]]  # (CompVis prefix, diffusers prefix, kind)

_RENAMES = {
    "same": (),
    "res_unet": (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                 ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")),
    "res_vae": (("nin_shortcut.", "conv_shortcut."),),
    "attn_vae": (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0.")),
    "attn_legacy": (("norm.", "group_norm."), ("proj_out.", "to_out.0.")),
}


def _rename(leaf: str, table, forward: bool) -> str:
    for a, b in table:
        src, dst = (a, b) if forward else (b, a)
        if leaf.startswith(src):
            return dst + leaf[len(src):]
    return leaf


def _split_qkv(t: Tensor, heads: int, legacy_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    """CompVis fused qkv (3C, ...) -> q, k, v (C, ...).

    Legacy order (QKVAttentionLegacy): channels are grouped per head as [q_h, k_h, v_h]; new order
    (QKVAttention): [q (all heads), k, v].
    """
    c3 = t.shape[0]
    c = c3 // 3
    if legacy_order:
        r = t.reshape(heads, 3, c // heads, *t.shape[1:])
        return tuple(r[:, i].reshape(c, *t.shape[1:]) for i in range(3))  # type: ignore[return-value]
    return tuple(t.reshape(3, c, *t.shape[1:])[i] for i in range(3))  # type: ignore[return-value]


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, legacy_order: bool) -> Tensor:
    c = q.shape[0]
    if legacy_order:
        parts = [x.reshape(heads, 1, c // heads, *x.shape[1:]) for x in (q, k, v)]
        return torch.cat(parts, 1).reshape(3 * c, *q.shape[1:])
    return torch.cat([q, k, v], 0)


def _convert_group(kind: str, group: dict[str, Tensor], forward: bool) -> dict[str, Tensor]:
    """Leaf tensors of one module, CompVis -> diffusers (``forward``) or back."""
    base, _, arg = kind.partition(":")
    out: dict[str, Tensor] = {}
    if base in ("attn_legacy", "attn_new"):
        heads, legacy = int(arg), base == "attn_legacy"
        table = _RENAMES["attn_legacy"]
        if forward:
            for leaf, t in group.items():
                if leaf.startswith("qkv."):
                    for name, part in zip(("to_q.", "to_k.", "to_v."), _split_qkv(t, heads, legacy)):
                        out[name + leaf[4:]] = part[..., 0] if part.ndim == 3 else part
                else:
                    new = _rename(leaf, table, True)
                    out[new] = t[..., 0] if new == "to_out.0.weight" and t.ndim == 3 else t
        else:
            for suffix in ("weight", "bias"):
                if f"to_q.{suffix}" in group:
                    q, k, v = (group[f"to_{n}.{suffix}"] for n in "qkv")
                    fused = _fuse_qkv(q, k, v, heads, legacy)
                    out[f"qkv.{suffix}"] = fused[..., None] if suffix == "weight" else fused
            for leaf, t in group.items():
                if leaf.split(".")[0] in ("to_q", "to_k", "to_v"):
                    continue
                new = _rename(leaf, table, False)
                out[new] = t[..., None] if new == "proj_out.weight" else t
        return out
    table = _RENAMES[base]
    for leaf, t in group.items():
        new = _rename(leaf, table, forward)
        if base == "attn_vae" and new.endswith("weight") and not new.startswith(("norm", "group_norm")):
            t = (t[:, :, 0, 0] if t.ndim == 4 else t) if forward else (t[:, :, None, None] if t.ndim == 2 else t)
        out[new] = t
    return out


def plan_to_diffusers(state: dict[str, Tensor], plan: Plan, root: str = "") -> tuple[dict[str, Tensor], set[str],
                                                                                    list[str]]:
    """Apply ``plan`` to CompVis keys under ``root``: (diffusers state, CompVis keys used, plan rows not found)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    absent: list[str] = []
    by_first: dict[str, list[str]] = {}
    for k in state:
        if k.startswith(root):
            by_first.setdefault(k[len(root):].split(".")[0], []).append(k)
    for cv, df, kind in plan:
        pre = root + cv + "."
        keys = [k for k in by_first.get(cv.split(".")[0], ()) if k.startswith(pre)]
        if not keys:
            absent.append(root + cv)
            continue
        group = {k[len(pre):]: state[k] for k in keys}
        for leaf, t in _convert_group(kind, group, True).items():
            out[f"{df}.{leaf}"] = t
        used.update(keys)
    return out, used, absent


def plan_to_compvis(state: dict[str, Tensor], plan: Plan, root: str = "") -> dict[str, Tensor]:
    """Inverse of ``plan_to_diffusers``: diffusers keys -> CompVis keys under ``root``."""
    out: dict[str, Tensor] = {}
    for cv, df, kind in plan:
        pre = df + "."
        group = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}
        for leaf, t in _convert_group(kind, group, False).items():
            out[f"{root}{cv}.{leaf}"] = t
    return out


# --------------------------------------------------------------------------- U-Net
@dataclass
class UNetSpec:
    """The CompVis ``openaimodel.UNetModel`` options that shape the network."""

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_heads: int = -1
    num_head_channels: int = -1
    spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    use_linear_in_transformer: bool = False
    use_scale_shift_norm: bool = False
    use_new_attention_order: bool = False
    num_classes: int | None = None
    image_size: int = 32

    @classmethod
    def from_params(cls, p: dict) -> "UNetSpec":
        for key, bad in (("resblock_updown", True), ("dims", 3), ("dims", 1)):
            if p.get(key) == bad:
                raise LDMError(f"unet_config {key}: {bad} is not supported")
        if p.get("n_embed") or p.get("disable_self_attentions") or p.get("adm_in_channels"):
            raise LDMError("unet_config options n_embed / disable_self_attentions / adm_in_channels are not supported")
        if isinstance(p.get("num_res_blocks"), (list, tuple)):
            raise LDMError("unet_config num_res_blocks must be one number")
        depth = p.get("transformer_depth", 1)
        if isinstance(depth, (list, tuple)):
            if len(set(depth)) != 1:
                raise LDMError("unet_config transformer_depth must be the same at every level")
            depth = depth[0]
        ctx = p.get("context_dim")
        if isinstance(ctx, (list, tuple)):
            ctx = ctx[0]
        nc = p.get("num_classes")
        if nc is not None and not isinstance(nc, int):
            raise LDMError(f"unet_config num_classes {nc!r} is not supported")
        spec = cls(in_channels=int(p["in_channels"]), out_channels=int(p["out_channels"]),
                   model_channels=int(p["model_channels"]), channel_mult=tuple(int(m) for m in p["channel_mult"]),
                   num_res_blocks=int(p["num_res_blocks"]),
                   attention_resolutions=tuple(int(a) for a in p["attention_resolutions"]),
                   num_heads=int(p.get("num_heads", -1)), num_head_channels=int(p.get("num_head_channels", -1)),
                   spatial_transformer=bool(p.get("use_spatial_transformer", False)), transformer_depth=int(depth),
                   context_dim=None if ctx is None else int(ctx),
                   use_linear_in_transformer=bool(p.get("use_linear_in_transformer", False)),
                   use_scale_shift_norm=bool(p.get("use_scale_shift_norm", False)),
                   use_new_attention_order=bool(p.get("use_new_attention_order", False)),
                   num_classes=nc, image_size=int(p.get("image_size", 32)))
        if spec.num_heads == -1 and spec.num_head_channels == -1:
            raise LDMError("unet_config needs num_heads or num_head_channels")
        if spec.spatial_transformer and spec.context_dim is None:
            raise LDMError("unet_config use_spatial_transformer needs context_dim")
        return spec

    @property
    def channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    def has_attention(self, level: int) -> bool:
        return 2 ** level in self.attention_resolutions

    def heads(self, ch: int) -> int:
        return self.num_heads if self.num_head_channels == -1 else ch // self.num_head_channels

    def attention_kind(self, ch: int) -> str:
        if self.spatial_transformer:
            return "same"
        return f"{'attn_new' if self.use_new_attention_order else 'attn_legacy'}:{self.heads(ch)}"

    def diffusers_class(self):
        from diffusers import UNet2DConditionModel, UNet2DModel

        return UNet2DConditionModel if self.spatial_transformer else UNet2DModel

    def diffusers_config(self) -> dict:
        ch = self.channels
        n = len(ch)
        common = dict(sample_size=self.image_size, in_channels=self.in_channels, out_channels=self.out_channels,
                      block_out_channels=tuple(ch), layers_per_block=self.num_res_blocks, flip_sin_to_cos=True,
                      freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
                      norm_num_groups=32, norm_eps=1e-5, num_class_embeds=self.num_classes,
                      resnet_time_scale_shift="scale_shift" if self.use_scale_shift_norm else "default")
        if self.spatial_transformer:
            heads = [self.heads(c) for c in ch]
            return dict(common,
                        down_block_types=tuple("CrossAttnDownBlock2D" if self.has_attention(i) else "DownBlock2D"
                                               for i in range(n)),
                        up_block_types=tuple("CrossAttnUpBlock2D" if self.has_attention(i) else "UpBlock2D"
                                             for i in reversed(range(n))),
                        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=self.context_dim,
                        attention_head_dim=heads[0] if len(set(heads)) == 1 else tuple(heads),
                        use_linear_projection=self.use_linear_in_transformer,
                        transformer_layers_per_block=self.transformer_depth)
        if self.num_head_channels != -1:
            head_dim = self.num_head_channels
        elif self.num_heads == 1:
            head_dim = None  # one head of the full width at every level
        else:
            raise LDMError("attention U-Nets with num_heads > 1 and no num_head_channels are not supported")
        return dict(common,
                    down_block_types=tuple("AttnDownBlock2D" if self.has_attention(i) else "DownBlock2D"
                                           for i in range(n)),
                    up_block_types=tuple("AttnUpBlock2D" if self.has_attention(i) else "UpBlock2D"
                                         for i in reversed(range(n))),
                    attention_head_dim=head_dim, add_attention=True)


def unet_plan(spec: UNetSpec) -> Plan:
    """CompVis ``UNetModel`` module names -> diffusers U-Net module names."""
    ch = spec.channels
    n = len(ch)
    plan: Plan = [("time_embed.0", "time_embedding.linear_1", "same"), ("time_embed.2", "time_embedding.linear_2", "same"),
                  ("input_blocks.0.0", "conv_in", "same"), ("out.0", "conv_norm_out", "same"),
                  ("out.2", "conv_out", "same")]
    if spec.num_classes is not None:
        plan.append(("label_emb", "class_embedding", "same"))
    i = 1
    for level in range(n):
        for j in range(spec.num_res_blocks):
            plan.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", "res_unet"))
            if spec.has_attention(level):
                plan.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", spec.attention_kind(ch[level])))
            i += 1
        if level != n - 1:
            plan.append((f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "same"))
            i += 1
    plan += [("middle_block.0", "mid_block.resnets.0", "res_unet"),
             ("middle_block.1", "mid_block.attentions.0", spec.attention_kind(ch[-1])),
             ("middle_block.2", "mid_block.resnets.1", "res_unet")]
    o = 0
    for b, level in enumerate(reversed(range(n))):
        for j in range(spec.num_res_blocks + 1):
            plan.append((f"output_blocks.{o}.0", f"up_blocks.{b}.resnets.{j}", "res_unet"))
            k = 1
            if spec.has_attention(level):
                plan.append((f"output_blocks.{o}.1", f"up_blocks.{b}.attentions.{j}", spec.attention_kind(ch[level])))
                k = 2
            if level != 0 and j == spec.num_res_blocks:
                plan.append((f"output_blocks.{o}.{k}.conv", f"up_blocks.{b}.upsamplers.0.conv", "same"))
            o += 1
    return plan


# --------------------------------------------------------------------------- first stage
@dataclass
class AutoencoderSpec:
    """CompVis first stage (``VQModelInterface`` or ``AutoencoderKL``) options."""

    kind: str  # "vq" or "kl"
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    n_embed: int | None = None
    resolution: int = 256

    @classmethod
    def from_config(cls, fs: dict) -> "AutoencoderSpec":
        target = str(fs.get("target", ""))
        p = fs.get("params") or {}
        dd = p.get("ddconfig") or {}
        if target.endswith(("VQModelInterface", "VQModel")):
            kind = "vq"
        elif target.endswith("AutoencoderKL"):
            kind = "kl"
        else:
            raise LDMError(f"first_stage_config target {target!r} is not supported (VQModelInterface or AutoencoderKL)")
        if dd.get("attn_resolutions"):
            raise LDMError("first stages with attention inside the down/up levels (attn_resolutions) are not supported")
        spec = cls(kind=kind, in_channels=int(dd["in_channels"]), out_ch=int(dd["out_ch"]), ch=int(dd["ch"]),
                   ch_mult=tuple(int(m) for m in dd["ch_mult"]), num_res_blocks=int(dd["num_res_blocks"]),
                   z_channels=int(dd["z_channels"]), embed_dim=int(p["embed_dim"]),
                   n_embed=int(p["n_embed"]) if kind == "vq" else None, resolution=int(dd.get("resolution", 256)))
        if kind == "kl" and (spec.embed_dim != spec.z_channels or not dd.get("double_z", True)):
            raise LDMError("AutoencoderKL first stages need embed_dim == z_channels and double_z: true")
        if kind == "vq" and dd.get("double_z", False):
            raise LDMError("VQ first stages need double_z: false")
        return spec

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def diffusers_config(self, scale_factor: float = 1.0) -> dict:
        n = len(self.ch_mult)
        cfg = dict(in_channels=self.in_channels, out_channels=self.out_ch, down_block_types=("DownEncoderBlock2D",) * n,
                   up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(self.ch * m for m in self.ch_mult),
                   layers_per_block=self.num_res_blocks, act_fn="silu", latent_channels=self.z_channels,
                   norm_num_groups=32, sample_size=self.resolution, scaling_factor=float(scale_factor))
        if self.kind == "vq":
            cfg.update(num_vq_embeddings=self.n_embed, vq_embed_dim=self.embed_dim)
        return cfg

    def diffusers_class(self):
        from diffusers import AutoencoderKL, VQModel

        return VQModel if self.kind == "vq" else AutoencoderKL


def autoencoder_plan(spec: AutoencoderSpec) -> Plan:
    """CompVis ``Encoder``/``Decoder`` (+ quantizer) module names -> diffusers names."""
    n = len(spec.ch_mult)
    plan: Plan = [("encoder.conv_in", "encoder.conv_in", "same")]
    for level in range(n):
        for j in range(spec.num_res_blocks):
            plan.append((f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", "res_vae"))
        if level != n - 1:
            plan.append((f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv",
                         "same"))
    for part in ("encoder", "decoder"):
        plan += [(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", "res_vae"),
                 (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", "attn_vae"),
                 (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", "res_vae")]
    plan += [("encoder.norm_out", "encoder.conv_norm_out", "same"), ("encoder.conv_out", "encoder.conv_out", "same"),
             ("decoder.conv_in", "decoder.conv_in", "same")]
    for level in reversed(range(n)):
        b = n - 1 - level
        for j in range(spec.num_res_blocks + 1):
            plan.append((f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{b}.resnets.{j}", "res_vae"))
        if level != 0:
            plan.append((f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{b}.upsamplers.0.conv", "same"))
    plan += [("decoder.norm_out", "decoder.conv_norm_out", "same"), ("decoder.conv_out", "decoder.conv_out", "same"),
             ("quant_conv", "quant_conv", "same"), ("post_quant_conv", "post_quant_conv", "same")]
    if spec.kind == "vq":
        plan.append(("quantize.embedding", "quantize.embedding", "same"))
    return plan


# --------------------------------------------------------------------------- building modules
def instantiate(cls, config: dict, state: dict[str, Tensor], what: str) -> nn.Module:
    """``cls(**config)`` with ``state`` loaded strictly (built on the meta device when possible: no random init)."""
    state = {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v).contiguous()
             for k, v in state.items()}
    module = None
    try:
        with torch.device("meta"):
            module = cls(**config)
        result = module.load_state_dict(state, strict=False, assign=True)
        if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
            module = None
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        module = None
    if module is None:
        module = cls(**config)
        result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        miss, unexp = result.missing_keys, result.unexpected_keys
        raise LDMError(f"{what}: the checkpoint does not match the config ({len(miss)} missing, {len(unexp)} "
                       f"unexpected weights, e.g. {(miss or unexp)[0]})")
    module.eval().requires_grad_(False)
    return module


def _check_all_used(state: dict[str, Tensor], root: str, used: set[str], absent: list[str], what: str,
                    ignore: Callable[[str], bool] = lambda k: False) -> None:
    if absent:
        raise LDMError(f"{what}: the checkpoint lacks {absent[0]}* ({len(absent)} modules of the config are missing); "
                       "the yaml config does not match this checkpoint")
    extra = [k for k in state if k.startswith(root) and k not in used and not ignore(k)]
    if extra:
        raise LDMError(f"{what}: {len(extra)} checkpoint weights are not used by the config (e.g. {extra[0]}); "
                       "the yaml config does not match this checkpoint")


def ema_unet_state(state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """``model.diffusion_model.X.Y`` filled from CompVis' EMA buffers ``model_ema.diffusion_modelXY`` (dots removed)."""
    if not any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates") for k in state):
        return None
    out = {}
    for k in state:
        if k.startswith(UNET_PREFIX):
            ema_key = "model_ema." + "".join(k.split(".")[1:])
            if ema_key not in state:
                raise LDMError(f"the checkpoint's EMA weights are incomplete (no {ema_key}); run with --use_ema false")
            out[k] = state[ema_key]
    return out


def build_unet(spec: UNetSpec, state: dict[str, Tensor], use_ema: bool) -> nn.Module:
    if use_ema:
        ema = ema_unet_state(state)
        if ema is None:
            log.info("use_ema: the checkpoint has no separate EMA weights; using its main weights")
        else:
            log.info("use_ema: using the checkpoint's EMA weights (model_ema.*)")
            state = {**{k: v for k, v in state.items() if not k.startswith(UNET_PREFIX)}, **ema}
    plan = unet_plan(spec)
    converted, used, absent = plan_to_diffusers(state, plan, UNET_PREFIX)
    _check_all_used(state, UNET_PREFIX, used, absent, "U-Net")
    return instantiate(spec.diffusers_class(), spec.diffusers_config(), converted, "U-Net")


def build_first_stage(spec: AutoencoderSpec, state: dict[str, Tensor], root: str, scale_factor: float) -> nn.Module:
    plan = autoencoder_plan(spec)
    converted, used, absent = plan_to_diffusers(state, plan, root)
    _check_all_used(state, root, used, absent, "first stage", ignore=lambda k: k[len(root):].startswith("loss."))
    return instantiate(spec.diffusers_class(), spec.diffusers_config(scale_factor), converted, "first stage")


def schedule_from(params: dict, state: dict[str, Tensor]) -> VPDiscreteSchedule:
    """VP discrete schedule from the checkpoint's ``alphas_cumprod`` (else the yaml's linear betas)."""
    if "alphas_cumprod" in state:
        ac = state["alphas_cumprod"].double()
        n = int(params.get("timesteps", ac.numel()))
        if ac.numel() != n:
            raise LDMError(f"alphas_cumprod has {ac.numel()} steps but the config says timesteps: {n}")
        return VPDiscreteSchedule(alphas_cumprod=ac)
    kind = params.get("beta_schedule", "linear")
    if kind != "linear":
        raise LDMError(f"beta_schedule {kind!r} without alphas_cumprod in the checkpoint is not supported")
    n = int(params.get("timesteps", 1000))
    start, end = float(params.get("linear_start", 1e-4)), float(params.get("linear_end", 2e-2))
    betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    return VPDiscreteSchedule(betas=betas)


# --------------------------------------------------------------------------- the noise-prediction network
class LatentDiffusionNet(nn.Module):
    """eps(x, t, cond, uc) of a latent diffusion U-Net on the VP discrete schedule, with guidance; decode().

    ``t`` is the continuous time in [1/N, 1]; the U-Net receives ``N (t - 1/N)``. With a condition
    and ``uc`` and ``guidance_scale != 1``: one U-Net call on the batch [uc; cond] and
    eps = eps_uc + scale (eps_c - eps_uc). A v-prediction U-Net (``prediction="v_prediction"``, SD 2.x)
    is guided the same way and its output turned into eps (``ld3.models.base.eps_from_v``).
    """

    def __init__(self, unet: nn.Module, first_stage: nn.Module, schedule: VPDiscreteSchedule, scale_factor: float,
                 guidance_scale: float = 1.0, cond_encoder: nn.Module | None = None, prediction: str = "epsilon"):
        super().__init__()
        if prediction not in ("epsilon", "v_prediction"):
            raise LDMError(f"prediction_type {prediction!r} is not supported (epsilon, v_prediction)")
        self.prediction = prediction
        self.unet, self.first_stage, self.cond_encoder = unet, first_stage, cond_encoder
        self.schedule = schedule
        self.scale_factor = float(scale_factor)
        self.guidance_scale = float(guidance_scale)
        self.cross_attention = getattr(getattr(unet, "config", None), "cross_attention_dim", None) is not None
        self.is_vq = hasattr(first_stage, "quantize")

    def _eps(self, x: Tensor, t_in: Tensor, c: Tensor | None) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        if self.cross_attention:
            if c is None:
                raise ValueError("this U-Net needs a condition (cross-attention context)")
            return self.unet(x.to(dtype), t_in, encoder_hidden_states=c.to(dtype)).sample
        return self.unet(x.to(dtype), t_in).sample

    def forward(self, x: Tensor, t: Tensor, cond: Any = None, uc: Any = None) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if not t.is_floating_point():
            t = t.to(x.dtype)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        t_in = self.schedule.model_time(t.reshape(-1))
        if cond is None or uc is None or self.guidance_scale == 1.0:
            eps = self._eps(x, t_in, cond)
        else:
            both = self._eps(torch.cat([x, x]), torch.cat([t_in, t_in]), torch.cat([uc, cond]))
            e_uc, e_c = both.chunk(2)
            eps = e_uc + self.guidance_scale * (e_c - e_uc)
        if self.prediction == "v_prediction":
            t = t.to(x.dtype)
            return eps_from_v(eps, x, self.schedule.alpha(t), self.schedule.sigma(t))
        return eps.to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        dtype = next(self.first_stage.parameters()).dtype
        z = (z / self.scale_factor).to(dtype)
        return self.first_stage.decode(z).sample.to(torch.float32)


def checkpointed_decode(net: LatentDiffusionNet, low_gpu: bool) -> Callable[[Tensor], Tensor]:
    """``net.decode``, with activation checkpointing while gradients are recorded when ``low_gpu``."""

    def decode(z: Tensor) -> Tensor:
        if low_gpu and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(net.decode, z, use_reentrant=False)
        return net.decode(z)

    return decode


# --------------------------------------------------------------------------- conditions
def class_conditions(embedding: nn.Embedding, guidance: bool) -> Callable[..., tuple[Any, Any]]:
    """ImageNet-style conditions: ClassEmbedder output (B, 1, D) of a label per sample index.

    Labels are drawn per index from ``index_generator(seed, index, stream=1)`` (training data);
    ``balanced=True`` gives ``index % n_classes`` instead (uniform over classes, for evaluation).
    The unconditional input is the embedding of the null class (the last row, 1000 for ImageNet).
    """
    n_classes = embedding.num_embeddings - 1
    null = n_classes

    def conditions(indices: Sequence[int], seed: int = 0, device: Any = None, balanced: bool = False):
        if balanced:
            labels = [int(i) % n_classes for i in indices]
        else:
            labels = [int(torch.randint(n_classes, (1,), generator=index_generator(seed, int(i), stream=1)))
                      for i in indices]
        w = embedding.weight
        with torch.no_grad():
            c = embedding(torch.tensor(labels, device=w.device))[:, None, :].float()
            uc = embedding(torch.full((len(labels),), null, device=w.device))[:, None, :].float() if guidance else None
        dev = device if device is not None else w.device
        return c.to(dev), None if uc is None else uc.to(dev)

    conditions.n_classes = n_classes  # type: ignore[attr-defined]
    return conditions


# --------------------------------------------------------------------------- shapes
def shapes(o: "Options", params: dict, unet: UNetSpec, first: AutoencoderSpec) -> tuple[tuple[int, int, int],
                                                                                      tuple[int, int, int]]:
    """(latent shape, image shape) from the config keys H, W, C, f, checked against the yaml."""
    f = first.factor
    if o.f is not None and o.f != f:
        raise LDMError(f"f: {o.f} in the config, but the first stage down-samples by {f}; set f: {f}")
    c = unet.in_channels
    if o.C is not None and o.C != c:
        raise LDMError(f"C: {o.C} in the config, but the U-Net takes {c} latent channels; set C: {c}")
    if first.embed_dim != c:
        raise LDMError(f"the first stage has {first.embed_dim} latent channels but the U-Net takes {c}")
    side = int(params.get("image_size", unet.image_size))
    h = o.H if o.H is not None else side * f
    w = o.W if o.W is not None else h
    if h % f or w % f:
        raise LDMError(f"H and W ({h}, {w}) must be multiples of the down-sampling factor f = {f}")
    return (c, h // f, w // f), (first.out_ch, h, w)


# --------------------------------------------------------------------------- loader
def _cond_kind(params: dict) -> str:
    cs = params.get("cond_stage_config")
    if cs in (None, "__is_unconditional__") or (isinstance(cs, str) and "unconditional" in cs):
        return "none"
    target = str(cs.get("target", "")) if isinstance(cs, dict) else str(cs)
    if target.endswith("ClassEmbedder"):
        return "class"
    if target.endswith("FrozenCLIPEmbedder"):
        return "text"
    raise LDMError(f"cond_stage_config {target!r} is not supported (ClassEmbedder, FrozenCLIPEmbedder or none)")


def _first_stage_state(params: dict, state: dict[str, Tensor], ckp: Path) -> tuple[dict[str, Tensor], str]:
    if any(k.startswith(FIRST_STAGE_PREFIX) for k in state):
        return state, FIRST_STAGE_PREFIX
    ref = ((params.get("first_stage_config") or {}).get("params") or {}).get("ckpt_path")
    p = resolve(ref)
    if p is None:
        raise LDMError(f"{ckp} has no first_stage_model weights and the config names no first-stage ckpt_path")
    if not p.is_file():
        raise LDMError(f"first-stage checkpoint {p} not found (the config's first_stage_config ckpt_path; "
                       f"{ckp.name} does not contain it): download it with `{download_hint(ckp)}`")
    log.info("first stage weights from %s", p)
    return read_state_dict(p), ""


def load_latent_diffusion(o: "Options", device: torch.device | str = "cpu") -> Model:
    """``Model`` of a CompVis latent diffusion checkpoint (``ckp_path`` + yaml ``config``), or of a diffusers folder."""
    from ld3.models.base import ModelError

    try:
        return _load(o)
    except LDMError as e:
        raise ModelError(str(e)) from None


def _load(o: "Options") -> Model:
    ckp_raw = o.ckp_path
    ckp = resolve(ckp_raw)
    if ckp is not None and ckp.is_dir():
        from ld3.models.stable_diffusion import load_diffusers_folder

        return load_diffusers_folder(o, ckp)
    cfg_path = resolve(o.config)
    params = None
    if cfg_path is not None and cfg_path.is_file():
        params = read_yaml(cfg_path)
    if ckp is None:
        raise LDMError("ckp_path is not set: point it at the CompVis .ckpt (e.g. pretrained/ldm/lsun_beds256/model.ckpt), "
                       f"fetched with `{download_hint(o.config, params)}`")
    if not ckp.is_file():
        raise LDMError(f"checkpoint {ckp} not found: download it with `{download_hint(ckp, params)}` "
                       "(or set ckp_path to an existing file)")
    if cfg_path is None:
        raise LDMError(f"config is not set: give the CompVis yaml of {ckp.name} (e.g. configs/latent-diffusion/"
                       "lsun_bedrooms-ldm-vq-4.yaml) with --config or the config key")
    if params is None:
        raise LDMError(f"model config {cfg_path} not found: the CompVis yamls ship in this repository under "
                       "configs/latent-diffusion/ and configs/stable-diffusion/; set config to one of them")
    kind = _cond_kind(params)
    if kind != "none" and params.get("conditioning_key", "crossattn") != "crossattn":
        raise LDMError(f"conditioning_key {params.get('conditioning_key')!r} is not supported (crossattn only)")
    uspec = UNetSpec.from_params((params["unet_config"] or {}).get("params") or {})
    fspec = AutoencoderSpec.from_config(params["first_stage_config"])
    latent_shape, img_shape = shapes(o, params, uspec, fspec)
    log.info("reading %s", ckp)
    try:
        state = read_state_dict(ckp)
    except LDMError as e:
        raise LDMError(f"{e}; download it again with `{download_hint(ckp, params)}`") from None
    schedule = schedule_from(params, state)
    pred = {"eps": "epsilon", "v": "v_prediction"}.get(str(params.get("parameterization", "eps")), "unknown")
    unet = build_unet(uspec, state, o.use_ema)
    scale_factor = float(params.get("scale_factor", 1.0))
    fs_state, fs_root = _first_stage_state(params, state, ckp)
    first = build_first_stage(fspec, fs_state, fs_root, scale_factor)
    guidance = o.scale
    info = {"ckp_path": str(ckp), "config": str(cfg_path), "img_shape": img_shape, "scale_factor": scale_factor,
            "first_stage": fspec.kind, "use_ema": o.use_ema}
    if kind == "none":
        net = LatentDiffusionNet(unet, first, schedule, scale_factor, 1.0, prediction=pred)
        conditions = None
        name = f"ldm:{ckp.parent.name or ckp.stem}"
    elif kind == "class":
        w = state.get(COND_PREFIX + "embedding.weight")
        if w is None:
            raise LDMError(f"{ckp} has no {COND_PREFIX}embedding.weight (the ClassEmbedder of the config)")
        n_cfg = int(((params["cond_stage_config"].get("params") or {}).get("n_classes")) or w.shape[0])
        if w.shape[0] != n_cfg:
            raise LDMError(f"the class embedding has {w.shape[0]} rows but the config says n_classes: {n_cfg}")
        emb = nn.Embedding(w.shape[0], w.shape[1])
        emb.weight.data.copy_(w.float())
        emb.requires_grad_(False)
        net = LatentDiffusionNet(unet, first, schedule, scale_factor, guidance, cond_encoder=emb, prediction=pred)
        conditions = class_conditions(emb, guidance=guidance != 1.0)
        info.update(n_classes=w.shape[0] - 1, null_class=w.shape[0] - 1, scale=guidance)
        name = f"ldm-class:{ckp.parent.name or ckp.stem}"
    else:
        from ld3.models.stable_diffusion import text_side

        encoder, conditions, extra = text_side(o, params, state, ckp, cfg_path, guidance)
        net = LatentDiffusionNet(unet, first, schedule, scale_factor, guidance, cond_encoder=encoder,
                                 prediction=pred)
        info.update(extra, scale=guidance)
        name = f"sd:{ckp.stem}"
    log.info("%s: latent %s -> image %s, %s first stage, scale_factor %g%s", name, latent_shape, img_shape,
             fspec.kind.upper(), scale_factor, f", guidance {guidance:g}" if kind != "none" else "")
    return make_model(name, net, latent_shape, conditions, info, o.low_gpu)


def make_model(name: str, net: LatentDiffusionNet, latent_shape, conditions, info: dict, low_gpu: bool) -> Model:
    kw = {} if conditions is None else {"conditions": conditions}
    return Model(name=name, noise_fn=net, schedule=net.schedule, latent_shape=tuple(latent_shape),
                 decode=checkpointed_decode(net, low_gpu), time_mode="time", net=net, info=info, **kw)


__all__ = ["LDMError", "LatentDiffusionNet", "UNetSpec", "AutoencoderSpec", "unet_plan", "autoencoder_plan",
           "plan_to_diffusers", "plan_to_compvis", "read_state_dict", "read_yaml", "load_latent_diffusion",
           "class_conditions", "schedule_from", "ema_unet_state", "instantiate", "download_hint", "resolve",
           "make_model"]
