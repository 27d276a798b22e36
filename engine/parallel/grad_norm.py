"""The global gradient norm, and clipping by it, for parameters in any layout: plain tensors
(whole, or replicated over tensor-parallel ranks), DTensors sharded by FSDP and/or TP, and the
stages of a pipeline (each rank holding only some layers: their squared norms are summed over
the pipeline group)."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _by_sharding(parameters: Iterable[torch.Tensor]) -> dict[object, list[torch.Tensor]]:
    """The gradients grouped by sharding: a foreach op takes DTensors of one sharding only."""
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        g = p.grad
        if g is not None:
            groups[(g.device_mesh, g.placements) if isinstance(g, DTensor) else None].append(g)
    return groups


def grad_norm(parameters: Iterable[torch.Tensor],
              pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The 2-norm of all gradients of the model (fp32, a plain tensor, the same on every rank)."""
    squares = []
    for key, members in _by_sharding(parameters).items():
        norms = torch.stack(torch._foreach_norm(members, 2.0))
        square = norms.float().pow(2).sum()
        squares.append(square.full_tensor() if key is not None else square)
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float | None,
                    pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scale the gradients so that their global norm is at most `max_norm` (None: measure
    only); returns the norm before clipping."""
    parameters = list(parameters)
    total = grad_norm(parameters, pp_group)
    if max_norm:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for members in _by_sharding(parameters).values():
            torch._foreach_mul_(members, coef.to(members[0].device))
    return total
