"""Files shipped with the package: the configs (``configs/`` of the checkout, installed as ``ld3.configs``).

``shipped(path)``: for a path such as ``configs/digits.yml`` or ``configs/latent-diffusion/cin256-v2.yaml``
that does not exist relative to the working directory, the packaged copy, so that the paper's
relative config paths work from any directory once installed. Imports nothing of ld3.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def configs_dir() -> Path | None:
    """The packaged configs folder, or None where the package was installed without it."""
    try:
        root = resources.files("ld3.configs")
    except (ModuleNotFoundError, TypeError):
        return None
    p = Path(str(root.joinpath("cifar10.yml"))).parent
    return p if p.is_dir() else None


def shipped(path: str | Path) -> Path | None:
    """The packaged file for a ``configs/...`` path, if there is one."""
    parts = Path(path).parts
    if len(parts) < 2 or parts[0] != "configs":
        return None
    try:
        q = resources.files("ld3.configs").joinpath(*parts[1:])
    except (ModuleNotFoundError, TypeError):
        return None
    return Path(str(q)) if q.is_file() else None


__all__ = ["configs_dir", "shipped"]
