"""Process-group helpers: the same code runs alone or under ``torchrun`` (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    """This process's place among ``world_size`` training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_topology(device: torch.device) -> Topology:
    """Join the process group that ``torchrun`` describes in the environment (no-op when run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Topology()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Topology(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def gather_objects(topology: Topology, value: Any) -> list[Any]:
    """Every process's ``value``, in rank order, on every process."""
    if not topology.distributed:
        return [value]
    gathered: list[Any] = [None] * topology.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(topology: Topology, value: Any) -> Any:
    """The main process's ``value`` on every process."""
    if not topology.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(topology: Topology) -> None:
    if topology.distributed:
        dist.barrier()


def shutdown(topology: Topology) -> None:
    if topology.distributed and dist.is_initialized():
        dist.destroy_process_group()
