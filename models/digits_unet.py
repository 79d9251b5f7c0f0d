"""The embedded pixel diffusion model: a small U-Net on the 8x8 scikit-learn digits.

Two parts, kept apart as in NVIDIA's EDM code:

- ``DigitsUNet``: the raw network ``F(x_in, c_noise)``, knows nothing about noise levels.
- ``DigitsDenoiser``: the EDM preconditioning around it (Karras et al. 2022, table 1)::

      c_skip  = sd^2 / (s^2 + sd^2)
      c_out   = s * sd / sqrt(s^2 + sd^2)
      c_in    = 1 / sqrt(s^2 + sd^2)
      c_noise = log(s) / 4
      D(x; s) = c_skip * x + c_out * F(c_in * x, c_noise)

  with ``sd = sigma_data = 0.5``. ``forward(x, sigma, class_labels=None)`` has the signature
  of EDM's ``EDMPrecond``, so the model drops into any code written for EDM networks.

Images are 1 x 8 x 8 in [-1, 1] (the digits' 0..16 grey levels scaled linearly).
The network is deliberately tiny (~0.2M parameters): LD3 differentiates through
few-step solvers and calls it thousands of times on a CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIGITS_CHANNELS = 1
DIGITS_RESOLUTION = 8
DIGITS_IMG_SHAPE: tuple[int, int, int] = (DIGITS_CHANNELS, DIGITS_RESOLUTION, DIGITS_RESOLUTION)
SIGMA_DATA = 0.5

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "digits_edm_unet.safetensors"
DEFAULT_FLOW_WEIGHTS = WEIGHTS_DIR / "digits_flow_unet.safetensors"

DEFAULT_ARCH: dict[str, Any] = dict(
    img_channels=DIGITS_CHANNELS,
    model_channels=32,
    channel_mult=(1, 1, 1),
    emb_channels=128,
    fourier_channels=32,
    dropout=0.1,
    num_groups=8,
)


class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar ``c_noise``: [cos(c f_k), sin(c f_k)], f_k geometric."""

    def __init__(self, num_channels: int, min_freq: float = 1.0, max_freq: float = 30.0):
        super().__init__()
        half = num_channels // 2
        # c_noise = log(sigma)/4 spans about [-1.6, 1.1] for sigma in [0.002, 80]: the slowest
        # frequency varies once over that range, the fastest resolves sigma to a few percent.
        freqs = torch.logspace(math.log10(min_freq), math.log10(max_freq), half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: Tensor) -> Tensor:
        arg = c.reshape(-1, 1) * self.freqs.to(c.dtype)
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, adaptive scale/shift from the noise embedding, GN-SiLU-dropout-conv, skip."""

    def __init__(self, cin: int, cout: int, emb_channels: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm0 = nn.GroupNorm(min(num_groups, cin), cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * cout)
        self.norm1 = nn.GroupNorm(min(num_groups, cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        return (h + self.skip(x)) * (1 / math.sqrt(2))


class DigitsUNet(nn.Module):
    """Raw U-Net ``F(x_in, c_noise)`` over resolutions 8 -> 4 -> 2 -> 4 -> 8.

    One residual block per level on the way down, one per level on the way up (fed the
    concatenated skip), and one at the bottom. Downsampling is 2x2 average pooling,
    upsampling nearest-neighbour. The output convolution starts at zero, so ``F = 0``
    (and ``D = c_skip x``) at initialisation.
    """

    def __init__(self, img_channels: int = 1, model_channels: int = 32,
                 channel_mult: tuple[float, ...] | list[float] = (1, 1, 1), emb_channels: int = 128,
                 fourier_channels: int = 32, dropout: float = 0.1, num_groups: int = 8):
        super().__init__()
        chans = [int(round(model_channels * m)) for m in channel_mult]
        self.fourier = FourierEmbedding(fourier_channels)
        self.emb = nn.Sequential(nn.Linear(fourier_channels, emb_channels), nn.SiLU(),
                                 nn.Linear(emb_channels, emb_channels), nn.SiLU())
        self.conv_in = nn.Conv2d(img_channels, chans[0], 3, padding=1)
        block = dict(emb_channels=emb_channels, dropout=dropout, num_groups=num_groups)
        self.down = nn.ModuleList()
        c = chans[0]
        for ch in chans:
            self.down.append(ResBlock(c, ch, **block))
            c = ch
        self.mid = ResBlock(c, c, **block)
        self.up = nn.ModuleList()
        for ch in reversed(chans):
            self.up.append(ResBlock(c + ch, ch, **block))
            c = ch
        self.norm_out = nn.GroupNorm(min(num_groups, c), c)
        self.conv_out = nn.Conv2d(c, img_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        emb = self.emb(self.fourier(c_noise))
        h = self.conv_in(x)
        skips = []
        for i, blk in enumerate(self.down):
            if i > 0:
                h = F.avg_pool2d(h, 2)
            h = blk(h, emb)
            skips.append(h)
        h = self.mid(h, emb)
        for i, blk in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = blk(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Preconditioned(nn.Module):
    """``c_skip x + c_out F(c_in x, c_noise)`` around ``DigitsUNet``: what the EDM denoiser and the flow model
    share; each says in ``preconditioning`` what its coefficients are at its noise variable (sigma, or t).

    ``forward(x, s, class_labels=None)``: ``x`` is B x C x H x W, ``s`` a scalar or a tensor with one value
    per sample. Unconditional: ``class_labels`` is accepted for EDM compatibility and ignored (as EDM does
    when ``label_dim == 0``). The network runs in its own dtype; the output is in ``x``'s dtype.
    """

    label_dim = 0

    def __init__(self, sigma_data: float = SIGMA_DATA, **arch: Any):
        super().__init__()
        self.arch = {**DEFAULT_ARCH, **arch}
        self.sigma_data = float(sigma_data)
        self.img_channels = self.arch["img_channels"]
        self.img_resolution = DIGITS_RESOLUTION
        self.model = DigitsUNet(**self.arch)

    def preconditioning(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor, s: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        net_dtype = self.model.conv_in.weight.dtype
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
        if s.ndim == 0:
            s = s.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.preconditioning(s.reshape(-1, 1, 1, 1))
        f_x = self.model((c_in * x).to(net_dtype), c_noise.reshape(-1).to(net_dtype))
        return c_skip * x + c_out * f_x.to(x.dtype)


class DigitsDenoiser(_Preconditioned):
    """EDM-preconditioned denoiser ``D(x; sigma)`` around ``DigitsUNet``: ``forward(x, sigma, class_labels=None)``
    (see ``_Preconditioned``), EDM's ``EDMPrecond`` signature."""

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` (any shape)."""
        sd2 = self.sigma_data ** 2
        s2 = sigma ** 2
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1 / (s2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class DigitsFlow(_Preconditioned):
    """Rectified-flow velocity ``v(x; t)`` around ``DigitsUNet``, for x_t = (1 - t) x_0 + t eps.

    ``forward(x, t, class_labels=None)`` returns ``v = eps - x_0 = dx/dt``. The preconditioning is
    EDM's idea carried over to the flow: with V = (1 - t)^2 sd^2 + t^2 the variance of x_t for data of
    variance sd^2,

        c_in   = 1 / sqrt(V)
        c_skip = (t - (1 - t) sd^2) / V        (the best linear guess of v from x_t)
        c_out  = sd / sqrt(V)                  (the standard deviation of what is left)
        c_noise = log(t / (1 - t)) / 4         (= EDM's log(sigma) / 4 at sigma = t / (1 - t))
        v = c_skip x + c_out F(c_in x, c_noise)

    so the raw network's input and target have unit variance at every t. Unconditional.
    """

    def preconditioning(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (c_skip, c_out, c_in, c_noise) at flow times ``t`` in (0, 1) (any shape)."""
        sd2 = self.sigma_data ** 2
        var = (1 - t) ** 2 * sd2 + t ** 2
        c_in = var.rsqrt()
        return (t - (1 - t) * sd2) / var, self.sigma_data * c_in, c_in, (t.log() - torch.log1p(-t)) / 4


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or frozen)."""
    return sum(p.numel() for p in module.parameters())


def card_path(weights_path: Path | str) -> Path:
    """The JSON card that sits beside a safetensors file."""
    return Path(weights_path).with_suffix(".json")


def load_digits_denoiser(path: Path | str | None = None, device: torch.device | str = "cpu") -> DigitsDenoiser:
    """Load the shipped (or a re-trained) denoiser in eval mode.

    The architecture comes from the JSON card beside the weights (``arch``); without a card
    the defaults of this module are used.
    """
    return _load(DigitsDenoiser, Path(path) if path is not None else DEFAULT_WEIGHTS, device, "")


def load_digits_flow(path: Path | str | None = None, device: torch.device | str = "cpu") -> DigitsFlow:
    """Load the shipped (or a re-trained) rectified-flow network in eval mode (architecture from its card)."""
    return _load(DigitsFlow, Path(path) if path is not None else DEFAULT_FLOW_WEIGHTS, device, " --objective flow")


def _load(cls: type, path: Path, device: torch.device | str, flag: str) -> Any:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"digits {'flow' if cls is DigitsFlow else 'denoiser'} weights not found: {path} "
                                f"(re-create them with scripts/train_digits_model.py{flag})")
    arch: dict[str, Any] = {}
    card = card_path(path)
    sigma_data = SIGMA_DATA
    if card.is_file():
        info = json.loads(card.read_text())
        arch = info.get("arch", {})
        sigma_data = info.get("sigma_data", SIGMA_DATA)
    net = cls(sigma_data=sigma_data, **arch)
    net.load_state_dict(load_file(str(path), device="cpu"))
    return net.to(device).eval().requires_grad_(False)


def sha256_of(path: Path | str) -> str:
    """Hex sha256 of a file."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_weights(state: dict[str, Tensor], path: Path | str, card: dict[str, Any]) -> dict[str, Any]:
    """Write ``state`` as safetensors and ``card`` (+ sha256, file size) as JSON beside it.

    Both files are written under a temporary name and renamed, so an interrupted run never
    leaves a half-written file. Returns the completed card.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.chmod(0o644)
    tmp.replace(path)
    card = {**card, "weights_file": path.name, "sha256": sha256_of(path), "file_bytes": path.stat().st_size}
    jpath = card_path(path)
    jtmp = jpath.with_name(jpath.name + ".tmp")
    jtmp.write_text(json.dumps(card, indent=2) + "\n")
    jtmp.replace(jpath)
    return card
