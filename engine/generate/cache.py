"""A KV cache installed into a model's attention modules from outside, for the length of a
decoding run: the model stays a plain nn.Module and knows nothing of decoding.

Prompts of a batch are left-padded to one length, so every row writes its next token into the
same slot and one decode step is one uniform forward. Which slots a query may see is the step's
mask: its own row's slots from its first real token up to itself. A padding slot sees only itself:
a query with no key at all would make softmax NaN, and a NaN value under a zero weight still
poisons the matrix product.

Where a step writes is a tensor and a step attends over a fixed `width` of slots (a multiple of
`WIDTH_STEP` in decoding; the mask hides the slots not yet written), so a decode step can be
captured once as a CUDA graph and replayed for every step of that width (engine/generate/graphs.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.attention import Attention

WIDTH_STEP = 64  # decode steps attend over slots rounded up to this: one CUDA graph per width


@dataclass
class Step:
    """What every layer's cache needs to know about the current forward: the slots its new keys
    and values go to [new tokens], and the mask [batch, 1, new tokens, width] of the keys a
    query may see among the first `width` slots."""

    write: torch.Tensor
    mask: torch.Tensor


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """q [batch, new, heads, dim] over k, v [batch, kv heads, slots, dim] under mask [batch, 1,
    new, slots] -> [batch, new, heads, dim]. The query heads of a KV group are folded into the
    query dimension: no fused kernel takes a mask and grouped heads together (torch falls back to
    its unfused path, which copies every key once per query head)."""
    batch, new, heads, dim = q.shape
    kv = k.shape[1]
    group = heads // kv
    q = q.view(batch, new, kv, group, dim).permute(0, 2, 3, 1, 4).reshape(batch, kv, -1, dim)
    if new > 1 and group > 1:
        mask = mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, 1, group * new, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.view(batch, kv, group, new, dim).permute(0, 3, 1, 2, 4).reshape(batch, new, heads,
                                                                              dim)


class LayerCache:
    """One attention layer's keys and values [batch, kv heads, slots, head dim], allocated at the
    first call with the shapes and dtype it is given (so tensor-parallel shards just work). Rows
    that leave the batch are dropped by moving the survivors to the front: the storage never
    moves, so captured graphs stay valid."""

    def __init__(self, step: Step, slots: int):
        self.step, self.slots = step, slots
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.k is None:
            self.k = k.new_zeros(k.shape[0], k.shape[2], self.slots, k.shape[3])
            self.v = v.new_zeros(v.shape[0], v.shape[2], self.slots, v.shape[3])
        rows, width = q.shape[0], self.step.mask.shape[-1]
        keys, values = self.k[:rows], self.v[:rows]
        keys.index_copy_(2, self.step.write, k.transpose(1, 2))
        values.index_copy_(2, self.step.write, v.transpose(1, 2))
        return grouped_attention(q, keys[:, :, :width], values[:, :, :width], self.step.mask)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the listed rows (unfinished sequences), in that order, as the first ones."""
        if self.k is not None:
            self.k[:len(rows)] = self.k[rows]
            self.v[:len(rows)] = self.v[rows]


def prefill_mask(pad: torch.Tensor, length: int) -> torch.Tensor:
    """[batch, 1, length, length]: causal, a row's padding (its first pad[b] slots) hidden from
    its real tokens."""
    slots = torch.arange(length, device=pad.device)
    causal = slots[None, :] <= slots[:, None]
    real = slots[None, None, :] >= pad[:, None, None]
    own = slots[None, :] == slots[:, None]
    return ((real | own) & causal)[:, None]


def decode_mask(pad: torch.Tensor, slot: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, 1, 1, width]: the token written at `slot` sees its row's slots from the first
    real one up to itself."""
    slots = torch.arange(width, device=pad.device)
    return ((slots[None, :] >= pad[:, None]) & (slots <= slot)[None])[:, None, None]


def decode_width(slot: int, slots: int) -> int:
    """The slots a decode step writing `slot` attends over: rounded up to WIDTH_STEP."""
    return min(slots, -(-(slot + 1) // WIDTH_STEP) * WIDTH_STEP)


@contextmanager
def kv_cache(model: nn.Module, step: Step, slots: int) -> Iterator[list[LayerCache]]:
    """Install a fresh cache of `slots` slots in every attention module; removed on exit."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    caches = [LayerCache(step, slots) for _ in layers]
    for layer, cache in zip(layers, caches):
        layer.cache = cache
    try:
        yield caches
    finally:
        for layer in layers:
            layer.cache = None
