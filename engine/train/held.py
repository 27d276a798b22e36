"""What one rank holds between the backward and the update, by category, in bytes of storage
(each storage once; FSDP's padding and anything materialised whole count): the planner's
prediction (engine/plan/memory.py) made measurable, logged after the first step and recorded
in the manifest (`held_bytes`, rank 0)."""

from __future__ import annotations

import torch
from torch import nn

from engine.model.llama import local_shard


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer,
               offloaded: bool = False) -> dict[str, int]:
    """`offloaded` (CPU offload): what lies in host memory is counted as `host` instead."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    masters = getattr(optimizer, "masters", {})  # MasterAdamW: fp32 masters beside bf16 weights
    state = [t for s in optimizer.state.values() for t in s.values()
             if isinstance(t, torch.Tensor)]
    sums = getattr(optimizer, "_flat_sum", None)  # its fp32 gradient sums
    categories = {
        "parameters": [local_shard(p.data) for p in params],
        "gradients": [local_shard(p.grad) for p in params if p.grad is not None],
        "masters": [w for p, w in masters.items() if w is not p],
        "optimizer": [local_shard(t) for t in state],
        "gradient_sums": [sums] if sums is not None else [],
    }
    out = {name: storage_bytes(t for t in tensors if not (offloaded and t.device.type == "cpu"))
           for name, tensors in categories.items()}
    if offloaded:
        out["host"] = storage_bytes(t for tensors in categories.values() for t in tensors
                                    if t.device.type == "cpu")
    return out


def storage_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors`, each counted once."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
