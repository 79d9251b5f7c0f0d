"""Model families: each declares the options it reads and how to load a ``Model`` from them.

``build_model(cfg, device) -> Model`` picks the family named by ``cfg["model"]``, reads the family's
declared options from ``cfg`` (typed; an undeclared one cannot be read) and calls its loader. The
command-line tools take their model options from here (``family_options``), so a family's options
appear in ``--help`` and in the run identity without being listed anywhere else.

Adding a model family = one loader file in ``models/`` + one ``register_family(Family(...))``
(here for the shipped ones, or in the user's own code before ``ld3.cli.main.main`` runs)::

    def load_toy(o: Options, device) -> Model:          # o.ckp_path, o.low_gpu, o.width, ...
        return Model("toy", noise_fn, VESchedule(), (1, 8, 8))

    register_family(Family("toy", load_toy, options=(FamilyOption("width", int, 64, "hidden width", lo=1),),
                           help="a toy model", small=lambda o: True))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ld3.models.base import Model, ModelError  # noqa: F401  (ModelError re-exported)
from ld3.samplers.schedules import NoiseSchedule, VESchedule


@dataclass(frozen=True)
class FamilyOption:
    """One option a model family reads: its name (the yml key and ``--name`` flag), type (``int``,
    ``float``, ``bool`` or ``str``), default, help, least value for numbers, allowed values, and whether
    it changes what the model computes (then it is part of the run identity)."""

    name: str
    type: type
    default: Any
    help: str
    lo: float | None = None
    choices: tuple | None = None
    identity: bool = True

    def read(self, v: Any) -> Any:
        """The typed value of ``v`` (the default when unset)."""
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")):
            return self.default
        if self.type is bool:
            if isinstance(v, str):
                return v.strip().lower() in ("1", "true", "yes", "y", "on")
            return bool(v)
        if self.type is int and isinstance(v, float):
            if not v.is_integer():
                raise ModelError(f"{self.name}: {v!r} is not an integer")
            return int(v)
        try:
            out = self.type(v)
        except (TypeError, ValueError):
            raise ModelError(f"{self.name}: {v!r} is not a {self.type.__name__}") from None
        if self.choices is not None and out not in self.choices:
            raise ModelError(f"{self.name} {out!r} is not available; choose from {', '.join(map(str, self.choices))}")
        return out


# Options every family gets (the core table of ld3.config documents them for the command line).
COMMON = (
    FamilyOption("ckp_path", str, None, "checkpoint file or folder of the pre-trained model"),
    FamilyOption("low_gpu", bool, False, "activation checkpointing of each network call", identity=False),
)


class Options(Mapping):
    """The typed options of one family, read-only: ``o.H`` or ``o["H"]``. Reading an option the family
    does not declare is an error, so a loader cannot depend on an undeclared key."""

    def __init__(self, family: str, values: dict[str, Any]):
        object.__setattr__(self, "_family", family)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"model family {self._family!r} declares no option {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("model options are read-only")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Options({self._family!r}, {self._values!r})"


def _never(o: Options) -> bool:
    return False


@dataclass(frozen=True)
class Family:
    """A model family: ``load(options, device) -> Model`` and what it declares.

    - ``options``: what it reads besides ``COMMON`` (``model``, ``ckp_path``, ``low_gpu``).
    - ``small(o)``: the network is small enough that one or two CPU threads are fastest.
    - ``schedule(o)``: its noise schedule without loading weights (for ``--export``), if known.
    - ``gits_dataset(o)``: which GITS table the paper's code uses for it (``utils.parse_prior_timesteps``);
      raises ``ValueError`` when there is none.
    """

    name: str
    load: Callable[[Options, torch.device], Model]
    options: tuple[FamilyOption, ...] = ()
    help: str = ""
    small: Callable[[Options], bool] = _never
    schedule: Callable[[Options], NoiseSchedule] | None = None
    gits_dataset: Callable[[Options], str] | None = None

    def read(self, cfg: Mapping[str, Any]) -> Options:
        vals = {"model": self.name}
        for opt in COMMON + self.options:
            vals[opt.name] = opt.read(cfg.get(opt.name))
        return Options(self.name, vals)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add (or replace) a family. An option name shared with another family must mean the same there."""
    for opt in family.options:
        for other in FAMILIES.values():
            same = next((o for o in other.options if o.name == opt.name), None)
            if same is not None and (same.type, same.default) != (opt.type, opt.default) and other.name != family.name:
                raise ValueError(f"option {opt.name!r} of family {family.name!r} differs from {other.name!r}'s")
    FAMILIES[family.name] = family
    return family


def get_family(name: Any) -> Family:
    if name not in FAMILIES:
        raise ModelError(f"unknown model {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_options() -> dict[str, tuple[FamilyOption, list[str]]]:
    """Every family option once: ``{name: (option, [families that read it])}``, in declaration order."""
    out: dict[str, tuple[FamilyOption, list[str]]] = {}
    for fam in FAMILIES.values():
        for opt in fam.options:
            out.setdefault(opt.name, (opt, []))[1].append(fam.name)
    return out


def identity_keys() -> tuple[str, ...]:
    """The options that change what a model computes (``model`` first): recorded in ``ld3_identity.json``."""
    return ("model",) + tuple(n for n, (o, _) in family_options().items() if o.identity)


def build_model(cfg: Mapping[str, Any], device: torch.device) -> Model:
    family = get_family(cfg.get("model"))
    model = family.load(family.read(cfg), device)
    if model.net is not None:
        model.net.to(device)
    return model


# --------------------------------------------------------------------------- the shipped families
_SCHEDULE = FamilyOption("schedule", str, "ve", "noise schedule of analytic models: ve, vp_discrete or flow "
                         "(rectified flow, as SD3 / Flux) (ours)", choices=("ve", "edm", "vp_discrete", "flow"))
_GMM = FamilyOption("gmm_components", int, 40, "number of mixture components of the digits GMM (ours)", lo=1)
_CONFIG = FamilyOption("config", str, None, "original (CompVis) yaml config of a latent diffusion checkpoint")
_H = FamilyOption("H", int, None, "decoded image height (latent models)", lo=1)
_W = FamilyOption("W", int, None, "decoded image width (latent models)", lo=1)
_C = FamilyOption("C", int, None, "latent channels (latent models)", lo=1)
_F = FamilyOption("f", int, None, "autoencoder down-sampling factor (latent side = H // f)", lo=1)
_EMA = FamilyOption("use_ema", bool, False, "use the EMA weights of a latent diffusion checkpoint (the paper's "
                    "code never does)")
_SCALE = FamilyOption("scale", float, 1.0, "classifier-free guidance scale")
_PROMPTS = FamilyOption("num_prompts", int, 5, "Stable Diffusion: number of prompts read from prompt_path", lo=1)
_PROMPT_PATH = FamilyOption("prompt_path", str, None, "Stable Diffusion: MS-COCO captions json", identity=False)

_MAXSEQ = FamilyOption("max_sequence_length", int, None, "T5 tokens of SD3 / Flux prompts (default: the "
                       "pipeline's, 256 / 512)", lo=1)

EMBEDDED = (None, "", "embedded", "embedded:digits")


def _analytic(o: Options, device: torch.device) -> Model:
    from ld3.models.analytic import digits_gmm_model, gaussian_model, gmm_model_from_file

    if o.model == "gaussian":
        return gaussian_model(o.schedule, seed=0)
    if o.ckp_path:  # a mixture saved to a file (the one the paper's code was run on, for instance)
        if not Path(o.ckp_path).is_file():
            raise ModelError(f"mixture file {o.ckp_path} not found; give a .pt file with weights, means and "
                             "variances, or no ckp_path to fit the digits mixture")
        try:
            return gmm_model_from_file(o.ckp_path, o.schedule)
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelError(str(e).splitlines()[0]) from None
    return digits_gmm_model(o.schedule, n_components=o.gmm_components)


def _analytic_schedule(o: Options) -> NoiseSchedule:
    from ld3.models.analytic import make_schedule

    return make_schedule(o.schedule)


def _edm(o: Options, device: torch.device) -> Model:
    path = o.ckp_path
    if path in EMBEDDED or str(path).endswith(".safetensors"):
        from ld3.models.base import edm_model
        from ld3.models.digits_unet import load_digits_denoiser

        weights = None if path in EMBEDDED else path
        if weights is not None and not Path(weights).is_file():
            raise ModelError(f"checkpoint {weights} not found; the embedded model lives at "
                             "models/weights/digits_edm_unet.safetensors (set ckp_path: embedded)")
        den = load_digits_denoiser(weights, device=str(device))
        return edm_model("digits_unet", den, (den.img_channels, den.img_resolution, den.img_resolution),
                         info={"ckp_path": str(weights or "embedded"), "dataset": "digits"})
    # NVIDIA EDM network pickle (edm-*.pkl), read without the EDM repository
    from ld3.models.edm_pickle import load_edm_model

    return load_edm_model(path, device)


def _digits_flow(o: Options, device: torch.device) -> Model:
    """The shipped rectified-flow U-Net on the digits (or a re-trained .safetensors with its card)."""
    from ld3.models.base import velocity_noise_fn
    from ld3.models.digits_unet import DEFAULT_FLOW_WEIGHTS, load_digits_flow

    weights = None if o.ckp_path in EMBEDDED else o.ckp_path
    if weights is not None and not Path(weights).is_file():
        raise ModelError(f"checkpoint {weights} not found; the embedded flow model lives at "
                         f"{DEFAULT_FLOW_WEIGHTS.name} (set ckp_path: embedded)")
    try:
        net = load_digits_flow(weights, device=str(device))
    except FileNotFoundError as e:
        raise ModelError(str(e)) from None
    schedule = _digits_flow_schedule(o)
    return Model(name="digits_flow", noise_fn=velocity_noise_fn(lambda x, t, c=None, uc=None: net(x, t), schedule),
                 schedule=schedule,
                 latent_shape=(net.img_channels, net.img_resolution, net.img_resolution), time_mode="time",
                 net=net, info={"ckp_path": str(weights or "embedded"), "dataset": "digits"})


def _digits_flow_schedule(o: Options) -> NoiseSchedule:
    """t from 0.99 to 1e-3: logit(t) spans the EDM digits model's log sigma range (log 80 = 4.4, log 0.002)."""
    from ld3.samplers.schedules import FlowSchedule

    return FlowSchedule(t_min=1e-3, T=0.99)


def _edm_small(o: Options) -> bool:
    return o.model == "digits_unet" or o.ckp_path in EMBEDDED or str(o.ckp_path).startswith("models/")


def _edm_gits(o: Options) -> str:
    path = str(o.ckp_path or "").lower()
    for name in ("cifar10", "afhqv2", "ffhq"):
        if name in path:
            return name
    raise ValueError(f"cannot tell the EDM dataset from ckp_path {o.ckp_path!r}: it should contain "
                     "'cifar10', 'afhqv2' or 'ffhq'")


def _latent(o: Options, device: torch.device) -> Model:
    """CompVis latent diffusion / Stable Diffusion: the yaml ``config`` says which (LSUN, ImageNet, SD)."""
    from ld3.models.latent_diffusion import load_latent_diffusion

    return load_latent_diffusion(o, device)


def _diffusers(o: Options, device: torch.device) -> Model:
    from ld3.models.diffusers_pipelines import load_diffusers_pipeline

    return load_diffusers_pipeline(o, device)


def _diffusers_schedule(o: Options) -> NoiseSchedule:
    from ld3.models.diffusers_pipelines import FLOW_PIPELINES, pipeline_class

    folder = Path(o.ckp_path or "")
    if pipeline_class(folder) in FLOW_PIPELINES:
        from ld3.samplers.schedules import FlowSchedule

        return FlowSchedule()
    from ld3.models.latent_diffusion import LDMError
    from ld3.models.stable_diffusion import schedule_from_scheduler_config

    try:
        return schedule_from_scheduler_config(folder)
    except LDMError as e:
        raise ModelError(str(e)) from None


_ANALYTIC = dict(load=_analytic, small=lambda o: True, schedule=_analytic_schedule)
_EDM = dict(load=_edm, small=_edm_small, schedule=lambda o: VESchedule(), gits_dataset=_edm_gits)
_LATENT = (_CONFIG, _H, _W, _C, _F, _EMA, _SCALE)

for _family in (
    Family("edm", options=(), help="an NVIDIA EDM pickle; with ckp_path: embedded, the shipped digits U-Net", **_EDM),
    Family("digits_gmm", options=(_SCHEDULE, _GMM), help="the digits Gaussian mixture, exact denoiser", **_ANALYTIC),
    Family("gaussian", options=(_SCHEDULE,), help="a Gaussian, exact denoiser and closed-form ODE", **_ANALYTIC),
    Family("latent_diff", _latent, _LATENT, "CompVis latent diffusion (LSUN, class-conditional ImageNet)",
           gits_dataset=lambda o: "lsun"),
    Family("conditioned_latent_diff", _latent, _LATENT + (_PROMPTS, _PROMPT_PATH),
           "Stable Diffusion (CompVis checkpoint + yaml, or a diffusers folder)", gits_dataset=lambda o: "sd"),
    Family("digits_unet", options=(), help="= edm with ckp_path embedded", **_EDM),
    Family("digits_flow", _digits_flow, (), "the embedded rectified-flow U-Net on the digits (ckp_path: embedded, "
           "or a re-trained .safetensors)", small=lambda o: True, schedule=_digits_flow_schedule),
    Family("diffusers", _diffusers, (_H, _W, _C, _F, _SCALE, _PROMPTS, _PROMPT_PATH, _MAXSEQ),
           "a local diffusers pipeline folder: Stable Diffusion 1.x / 2.x, SDXL, SD3 / 3.5, FLUX.1",
           schedule=_diffusers_schedule),
):
    register_family(_family)


__all__ = ["Family", "FamilyOption", "Options", "FAMILIES", "COMMON", "register_family", "get_family",
           "family_options", "identity_keys", "build_model", "ModelError"]
