"""Just enough torch.distributed for data-parallel training under `torchrun`.

`torchrun --nproc_per_node=N train.py ...` starts N processes and sets RANK / LOCAL_RANK / WORLD_SIZE. Each
process trains the same model on different batches; DistributedDataParallel averages the gradients during
backward. gloo carries them between CPU processes, nccl between GPUs. Without torchrun: world size 1, no-op.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group if launched by torchrun; return this process's place in it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The average of a scalar over all processes (a copy; the input is left alone)."""
    if info.world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the process group once every rank is done: a rank that tore gloo down while rank 0 was still saving
    its checkpoint died in C++ ("terminate called without an active exception", SIGABRT) now and then."""
    if info.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
