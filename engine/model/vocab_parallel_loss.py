"""The fused LM head + cross-entropy of engine/model/fused_loss.py when tensor parallelism shards
the head's weight over the vocabulary (a DTensor, Shard(0)): each rank computes the logits of its
vocabulary slice, chunk by chunk, and the softmax's max, sum and the target's logit are reduced
over the TP group (three [rows] all-reduces a chunk), so no rank ever holds a row's full logits.
The gradient with respect to the hidden states is summed over the group once, after the last
chunk.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from engine.model.fused_loss import _LinearCrossEntropy


def _chunk(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, first: int,
           group: dist.ProcessGroup, need_grad: bool):
    """Loss sum of one chunk (the same on every rank) and, if asked, its gradient with respect
    to this rank's logits."""
    x = logits.float()
    top = x.max(dim=-1).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(x - top[:, None]).sum(dim=-1)
    dist.all_reduce(total, group=group)
    lse = top + total.log()
    local = targets - first
    mine = (local >= 0) & (local < x.shape[1])
    target_logit = x.gather(1, local.clamp(0, x.shape[1] - 1)[:, None])[:, 0] * mine
    dist.all_reduce(target_logit, group=group)
    loss = ((lse - target_logit) * mask).sum()
    if not need_grad:
        return loss, None
    grad = torch.exp(x - lse[:, None])
    grad[mine.nonzero()[:, 0], local[mine]] -= 1.0
    return loss, (grad * mask[:, None]).to(logits.dtype)


class _VocabParallelLinearCrossEntropy(_LinearCrossEntropy):
    """The backward is the one-process one: scale the gradients the forward saved."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, group, chunk_rows: int, compute_dtype):
        h = hidden.reshape(-1, hidden.shape[-1])
        t, m = targets.reshape(-1), mask.reshape(-1).to(torch.float32)
        w = weight.to(compute_dtype)
        first = dist.get_rank(group) * weight.shape[0]
        need_grad = any(ctx.needs_input_grad[:2])
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            hc = h[start:start + chunk_rows].to(compute_dtype)
            rows = slice(start, start + chunk_rows)
            loss, g = _chunk(hc @ w.t(), t[rows], m[rows], first, group, need_grad)
            total += loss
            if need_grad:
                grad_h[rows] = (g @ w).float()
                grad_w += (g.t() @ hc).float()
        if need_grad:
            dist.all_reduce(grad_h, group=group)  # each rank's vocabulary slice adds its part
            ctx.save_for_backward(grad_h.to(hidden.dtype).view(hidden.shape),
                                  grad_w.to(weight.dtype))
        return total


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: DTensor, targets: torch.Tensor,
                                 mask: torch.Tensor, chunk_rows: int,
                                 compute_dtype: torch.dtype) -> torch.Tensor:
    """As linear_cross_entropy, for a head weight sharded over the vocabulary on a 1-D TP mesh;
    `hidden` a plain tensor or a DTensor on that mesh (sequence-sharded: gathered here)."""
    if isinstance(hidden, DTensor):
        hidden = hidden.redistribute(placements=[Replicate()]).to_local()
    group = weight.device_mesh.get_group()
    return _VocabParallelLinearCrossEntropy.apply(hidden, weight.to_local(), targets, mask, group,
                                                  chunk_rows, compute_dtype)
