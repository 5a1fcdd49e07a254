"""Process groups, model wrapping (DDP or FSDP2) and batch sharding for `torchrun` launches.

Shape letters: B rows per step (all ranks), T seq_len, W world size. Rank r reads rows [r*B/W, (r+1)*B/W) of
each step's B rows (`PackedBatches(rank=r, world_size=W)`), so W ranks see the rows one process sees with B rows;
the trainer weights losses by predicted-token counts so the averaged gradient equals the single-process one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "setup_distributed", "teardown_distributed", "wrap_model", "all_reduce_sum",
           "gather_objects", "barrier"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was requested but torch sees no CUDA GPU; use device: auto or cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def setup_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment (a no-op for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def wrap_model(model: nn.Module, info: DistInfo, parallel: str) -> nn.Module:
    """DDP (replicated weights) or FSDP2 (`fully_shard` on every block, then the root); unchanged when W = 1."""
    if not info.distributed:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj` as a list on every rank (small Python objects only, e.g. RNG states)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
