"""The engine's side of the distributed bootstrap: cluster/ (or torchrun) exports RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; this module turns them into a process group
(NCCL on GPUs, gloo on CPU, both under CPU offload) and a device."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from engine.errors import InputError


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", timeout_s: int = 1800, cpu_offload: bool = False) -> Env:
    """Join the job's process group (when WORLD_SIZE > 1) and pick this rank's device.
    `cpu_offload`: FSDP keeps its shards in host memory, so the group gets gloo for CPU tensors
    beside NCCL, and one process gets a group of its own (FSDP shards over a mesh)."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if dist.is_initialized() or (world == 1 and not cpu_offload):
        return Env(rank, world, local, dev)
    backend = "gloo" if not use_cuda else "cpu:gloo,cuda:nccl" if cpu_offload else "nccl"
    # one process needs no rendezvous: a store of its own
    store = dist.HashStore() if world == 1 else None
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=dev if use_cuda else None)
    return Env(rank, world, local, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (picklable objects)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(work: Callable[[], Any]) -> Any:
    """`work()` on rank 0; its result, or its error, on every rank (so that all ranks stop
    together rather than wait for one that failed)."""
    if not dist.is_initialized():
        return work()
    result = failure = None
    try:
        if dist.get_rank() == 0:
            result = work()
    except Exception as exc:  # rank 0's own error, raised there once the others know of it
        failure = exc
    result, message = broadcast_object((result, str(failure) if failure else None))
    if failure is not None:
        raise failure
    if message is not None:
        raise InputError(f"rank 0 stopped: {message}")
    return result
