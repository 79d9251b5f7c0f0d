"""torch.distributed for the commands run under ``torchrun --nproc_per_node N`` (and ``--nnodes``).

``init()`` joins the process group that torchrun describes in the environment (NCCL between GPUs,
gloo on CPUs) and returns this process's place; without torchrun it returns a single process and
does nothing. Sample indices are shared out by batch, so every sample is computed in the batch a
one-process run computes it in: the files are the same, byte for byte, for any number of ranks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Place:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

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
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, on the CPU for gloo, on this rank's GPU for NCCL)."""
        if not self.active:
            return list(values)
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return t.cpu().tolist()

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
    return place


__all__ = ["Place", "init"]
