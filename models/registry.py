"""Model loaders by name: ``build_model(cfg, device) -> Model``.

Adding a model family = one loader file in ``models/`` + one entry here + one config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ld3.models.base import Model


from ld3.models.base import ModelError  # noqa: F401  (re-exported)


def _analytic(cfg: dict, device: torch.device) -> Model:
    from ld3.models.analytic import digits_gmm_model, gaussian_model

    if cfg.get("schedule") not in ("ve", "edm", "vp_discrete", "flow"):
        raise ModelError(f"schedule {cfg.get('schedule')!r} is not available for analytic models; use ve, "
                         "vp_discrete or flow")
    if cfg["model"] == "gaussian":
        return gaussian_model(cfg["schedule"], seed=0)
    if cfg.get("ckp_path"):  # a mixture saved to a file (the one the paper's code was run on, for instance)
        from ld3.models.analytic import gmm_model_from_file

        if not Path(cfg["ckp_path"]).is_file():
            raise ModelError(f"mixture file {cfg['ckp_path']} not found; give a .pt file with weights, means and "
                             "variances, or no ckp_path to fit the digits mixture")
        try:
            return gmm_model_from_file(cfg["ckp_path"], cfg["schedule"])
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelError(str(e).splitlines()[0]) from None
    return digits_gmm_model(cfg["schedule"], n_components=int(cfg.get("gmm_components") or 40))


def _edm(cfg: dict, device: torch.device) -> Model:
    path = cfg.get("ckp_path")
    if path in (None, "", "embedded", "embedded:digits") or str(path).endswith(".safetensors"):
        from ld3.models.base import edm_model
        from ld3.models.digits_unet import load_digits_denoiser

        weights = None if path in (None, "", "embedded", "embedded:digits") else path
        if weights is not None and not Path(weights).is_file():
            raise ModelError(f"checkpoint {weights} not found; the embedded model lives at "
                             "models/weights/digits_edm_unet.safetensors (set ckp_path: embedded)")
        den = load_digits_denoiser(weights, device=str(device))
        return edm_model("digits_unet", den, (den.img_channels, den.img_resolution, den.img_resolution), info={"ckp_path": str(weights or "embedded")})
    # NVIDIA EDM network pickle (edm-*.pkl), read without the EDM repository
    from ld3.models.edm_pickle import load_edm_model

    return load_edm_model(path, device)


def _latent(cfg: dict, device: torch.device) -> Model:
    """CompVis latent diffusion / Stable Diffusion: the yaml ``config`` says which (LSUN, ImageNet, SD)."""
    from ld3.models.latent_diffusion import load_latent_diffusion

    return load_latent_diffusion(cfg, device)


LOADERS: dict[str, Callable[[dict, torch.device], Model]] = {
    "digits_gmm": _analytic,
    "gaussian": _analytic,
    "edm": _edm,
    "digits_unet": _edm,
    "latent_diff": _latent,
    "conditioned_latent_diff": _latent,
}


def build_model(cfg: dict[str, Any], device: torch.device) -> Model:
    name = cfg.get("model")
    if name not in LOADERS:
        raise ModelError(f"unknown model {name!r}; choose from {', '.join(LOADERS)}")
    model = LOADERS[name](cfg, device)
    if model.net is not None:
        model.net.to(device)
    return model
