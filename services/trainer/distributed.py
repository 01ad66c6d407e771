"""DDP plumbing: the same command runs alone or under `torchrun` / `accelerate launch` (one process per GPU,
gloo on the CPU). Rank 0 writes checkpoints, logs and the final artifact; decisions it makes (which checkpoint
to resume, when to save) are broadcast so every rank agrees."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, …] on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def backend(cuda: bool) -> str:
    """The process group's backends: NCCL for CUDA tensors, gloo for CPU ones (the loop's figures, object
    collectives). A plain "nccl" group has no backend for CPU tensors in torch 2.13: the first all-reduce of
    a CPU tensor fails with "No backend type associated with device type cpu"."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def setup() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend(cuda), device_id=device if cuda else None)
        return Dist(dist.get_rank(), dist.get_world_size(), local, device)
    return Dist(0, 1, 0, device)


def fingerprint(params) -> str:
    """SHA-256 over the exact bytes of `params` (to prove the ranks hold identical weights)."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
