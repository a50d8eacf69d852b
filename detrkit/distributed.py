"""The little that training needs to run unchanged under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_from_env() -> torch.device:
    """Join the process group when started by torchrun; return this process's device."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (e.g. BatchNorm running statistics)."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def mean_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Average logged scalars over processes (for logging only; every rank gets the result)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: v / world_size() for k, v in zip(keys, t.tolist())}


def from_main(value: float) -> float:
    """Rank 0's ``value`` on every process. The training clock goes through this so that every
    process stops after the same step: one that stopped alone would leave the others waiting
    forever in their next all-reduce."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return t.item()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
