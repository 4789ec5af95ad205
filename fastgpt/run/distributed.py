"""The process group of a `torchrun` launch: start, stop, and which process this is.

    torchrun --nproc_per_node 2 -m fastgpt train ...      # sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*

    setup(device)        # once per process: joins the group (NCCL on CUDA, gloo on CPU); no-op without torchrun
    rank(), world_size(), is_main()
    teardown()           # destroy_process_group; call it in a `finally`, so an error also shuts down cleanly

A process not started by torchrun is rank 0 of a world of 1 and starts no process group, so the
single-process trainer runs no collective at all.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def enabled() -> bool:
    """Whether this process is one of a process group (collectives run)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if enabled() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """This process's index on its machine: the GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if enabled() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Rank 0: the one process that evaluates, writes checkpoints and metrics, and prints."""
    return rank() == 0


def setup(device: torch.device) -> None:
    """Joins torchrun's process group, once; NCCL for a CUDA device, gloo for CPU."""
    if enabled() or not launched_by_torchrun():
        return
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; launch without torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives and barrier run on this GPU
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")


def teardown() -> None:
    if enabled():
        dist.destroy_process_group()


def barrier() -> None:
    if enabled():
        dist.barrier()


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over the processes (the value itself in a single process)."""
    if not enabled():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world_size()


def gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order, on every process."""
    if not enabled():
        return [obj]
    objects: list[Any] = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects
