"""torch.distributed for the commands run under ``torchrun --nproc_per_node N`` (and ``--nnodes``).

``init()`` joins the process group that torchrun describes in the environment (NCCL between GPUs,
gloo on CPUs) and returns this process's place; without torchrun it returns a single process and
does nothing. Sample indices are shared out by batch, so every sample is computed in the batch a
one-process run computes it in: the files are the same, byte for byte, for any number of ranks.

When one process fails, torchrun stops the others (SIGTERM): rank 0 then says so in one line
(``PeerFailed``) and every rank leaves through its ``finally`` blocks (locks released, whole files
only). A collective that finds a peer gone (no torchrun agent to stop us) raises ``PeerFailed`` too.
Every collective counts the bytes it reduces (``Place.traffic``), for bench and result.json.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ld3.errors import PeerFailed


@dataclass(frozen=True)
class Place:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    traffic: dict = field(default_factory=lambda: {"bytes": 0, "calls": 0}, compare=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def owns(self, batch_number: int) -> bool:
        """Whether this rank computes batch ``batch_number`` (round robin)."""
        return batch_number % self.world == self.rank

    def barrier(self) -> None:
        if self.active:
            with _collective("barrier"):
                dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (counted in ``traffic``); returns it."""
        if self.active:
            with _collective("all_reduce"):
                dist.all_reduce(t)
            self.traffic["bytes"] += t.numel() * t.element_size()
            self.traffic["calls"] += 1
        return t

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, on the CPU for gloo, on this rank's GPU for NCCL)."""
        if not self.active:
            return list(values)
        return self.all_reduce(torch.tensor(values, dtype=torch.float64, device=self._device())).cpu().tolist()

    def sum_array(self, a: np.ndarray) -> np.ndarray:
        """Element-wise float64 sum of an array over ranks (feature statistics)."""
        if not self.active:
            return a
        t = self.all_reduce(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(self._device()))
        return t.cpu().numpy()

    def gather_to_main(self, obj):
        """Every rank's ``obj`` as a list in rank order on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.main else None
        with _collective("gather"):
            dist.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def init(cfg: dict | None = None) -> Place:
    """Join torchrun's process group (if any); on CUDA each rank takes its local GPU (unless --device says);
    ranks other than 0 log warnings only."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return Place()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (cfg is None or not str(cfg.get("device") or "").startswith("cpu"))
    if use_cuda:
        torch.cuda.set_device(local)
        if cfg is not None and not cfg.get("device"):
            cfg["device"] = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    place = Place(dist.get_rank(), dist.get_world_size(), local)
    if not place.main:
        logging.getLogger("ld3").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, lambda signum, frame: _stopped(place))
    return place


class _collective:
    """Turns a collective's failure (a peer that died, a closed connection) into ``PeerFailed``."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and isinstance(exc, RuntimeError):
            raise PeerFailed(f"another process of this job stopped during {self.what} "
                             f"({str(exc).splitlines()[0][:120]}); its own message names the cause") from None
        return False


def _stopped(place: Place) -> None:
    """SIGTERM (torchrun stopping the survivors of a failed rank): leave through the finally blocks."""
    raise PeerFailed("stopped: another process of this torchrun job failed (torchrun's report below names it); "
                     "the files written so far are whole, and the same command resumes", quiet=not place.main)


__all__ = ["Place", "PeerFailed", "init"]
