"""Context parallelism: each sequence split over the ranks of the mesh's "cp" dimension, so that
a sequence too long for one GPU's activations trains on several.

The sequence is cut into 2·cp chunks and rank r keeps chunks r and 2·cp − 1 − r: under a causal
mask an early chunk attends to few keys and a late one to many, so each rank gets the same
attention work (Megatron-LM's and torchtitan's load balancing). Everything but attention is
per token and runs on the local chunks as it is; each attention layer gathers the keys and
values of the whole sequence from the cp ranks (their gradients summed back in the backward)
and attends each local query chunk to the keys up to its own end, causal aligned bottom-right.
Gathering K and V rather than passing them round a ring keeps one collective a layer; with
grouped KV heads they are a fraction of the activations (Llama 3 trained at 128k this way).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from engine.model.attention import Kernel, attention_kernel, sdpa_attention


def local_positions(seq_len: int, cp: int, rank: int, device: torch.device | None = None
                    ) -> torch.Tensor:
    """The positions of the sequence that context-parallel rank `rank` holds, in its order."""
    chunk = seq_len // (2 * cp)
    first, second = rank * chunk, (2 * cp - 1 - rank) * chunk
    return torch.cat((torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)))


def shard_sequence(tensors: tuple[torch.Tensor, ...], cp: int, rank: int
                   ) -> tuple[torch.Tensor, ...]:
    """This rank's tokens of each [batch, seq] tensor (its two chunks, in that order)."""
    positions = local_positions(tensors[0].shape[1], cp, rank, tensors[0].device)
    return tuple(t[:, positions] for t in tensors)


class _GatherSequence(torch.autograd.Function):
    """[batch, seq / cp, ...] local chunks -> [batch, seq, ...] in sequence order; backward: the
    gradients of every rank's use summed, this rank's chunks taken."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.group, ctx.cp, ctx.rank = group, cp, rank
        parts = [torch.empty_like(local) for _ in range(cp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        chunks: list[torch.Tensor | None] = [None] * (2 * cp)
        for r, part in enumerate(parts):
            chunks[r], chunks[2 * cp - 1 - r] = part.chunk(2, dim=1)
        return torch.cat(chunks, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        chunks = grad.chunk(2 * ctx.cp, dim=1)
        return torch.cat((chunks[ctx.rank], chunks[2 * ctx.cp - 1 - ctx.rank]), dim=1), None


def context_parallel_kernel(backend: str, group: dist.ProcessGroup, seq_len: int) -> Kernel:
    """An attention kernel over this rank's chunks of q, k, v [batch, seq_len / cp, heads,
    head_dim] that attends to the whole sequence's keys, each chunk causal up to its own end
    (aligned bottom-right): through flash-attn, which aligns so, or SDPA with that mask (the
    sdpa and eager backends)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = seq_len // (2 * cp)
    ends = [(index + 1) * chunk for index in (rank, 2 * cp - 1 - rank)]
    if backend == "flash_attn":
        chunk_attention = [attention_kernel(backend)] * 2
    else:
        chunk_attention = [partial(sdpa_attention, mask=causal_lower_right(chunk, end))
                           for end in ends]

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[1] != 2 * chunk:
            raise ValueError(f"context-parallel attention was set up for sequences of {seq_len} "
                             f"tokens ({2 * chunk} a rank), not {q.shape[1] * cp}")
        keys, values = _GatherSequence.apply(k, group), _GatherSequence.apply(v, group)
        return torch.cat([kernel(q[:, i * chunk:(i + 1) * chunk], keys[:, :end], values[:, :end])
                          for i, (kernel, end) in enumerate(zip(chunk_attention, ends))], dim=1)

    return attention


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup, seq_len: int) -> None:
    """`model` (a LlamaModel) takes this rank's chunks of sequences of `seq_len` tokens
    (shard_sequence's): its attention layers attend across the cp ranks, and RoPE gets the
    chunks' positions in the whole sequence."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    kernel = context_parallel_kernel(model.cfg.attention_backend, group, seq_len)
    for block in model.layers.values():
        block.attn.kernel = kernel
    positions = local_positions(seq_len, cp, rank)[None]

    def pass_positions(_module, args, kwargs):
        if len(args) < 2 and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = positions.to(args[0].device)
        return args, kwargs

    model.register_forward_pre_hook(pass_positions, with_kwargs=True)
