"""Data parallelism over every rank of the job: DDP (replicated optimizer; fastest for small
models) or FSDP2 `fully_shard` per block (ZeRO-3 style sharding of parameters, gradients and
optimizer state: Megatron's distributed optimizer and more)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel import DataParallel


def wrap(model: nn.Module, mode: DataParallel, device: torch.device) -> nn.Module:
    """Wrap for data parallelism; a single process gets the model back unchanged."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers.values():
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        ddp.register_comm_hook(None, _fp32_mean)
    return ddp


def _fp32_mean(_state, bucket):  # no annotations: DDP checks them, and they would be strings here
    """DDP communication hook for bf16 gradients (a dist.GradBucket in, a Future of its tensor
    out): the mean over ranks is summed in fp32 and rounded to bf16 once (NCCL would round after
    every addition of a bf16 sum)."""
    buffer = bucket.buffer()
    total = buffer.float().div_(dist.get_world_size())

    def write_back(fut: torch.futures.Future) -> torch.Tensor:
        return buffer.copy_(fut.value()[0])

    return dist.all_reduce(total, async_op=True).get_future().then(write_back)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce gradients across ranks only on the last micro-batch of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP's flag behind no_sync()
        model.require_backward_grad_sync = enabled
