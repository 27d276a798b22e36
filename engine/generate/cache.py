"""A KV cache installed into a model's attention modules from outside, for the length of a
decoding run: the model stays a plain nn.Module and knows nothing of decoding.

Prompts of a batch are left-padded to one length, so every row writes its next token into the
same slot and one decode step is one uniform forward. Which slots a query may see is the step's
mask: its own row's slots from its first real token up to itself. A padding slot sees only itself:
a query with no key at all would make softmax NaN, and a NaN value under a zero weight still
poisons the matrix product.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.attention import Attention


@dataclass
class Step:
    """What every layer's cache needs to know about the current forward: the first slot it
    writes and the mask [batch, 1, new tokens, slots up to the last written] of visible keys."""

    start: int
    mask: torch.Tensor


class LayerCache:
    """One attention layer's keys and values [batch, slots, kv heads, head dim], allocated at the
    first call with the shapes and dtype it is given (so tensor-parallel shards just work)."""

    def __init__(self, step: Step, slots: int):
        self.step, self.slots = step, slots
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.k is None:
            self.k = k.new_zeros(k.shape[0], self.slots, *k.shape[2:])
            self.v = v.new_zeros(v.shape[0], self.slots, *v.shape[2:])
        start, end = self.step.start, self.step.start + q.shape[1]
        self.k[:, start:end], self.v[:, start:end] = k, v
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), self.k[:, :end].transpose(1, 2), self.v[:, :end].transpose(1, 2),
            attn_mask=self.step.mask, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the rows not listed (finished sequences) from the cache."""
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


def prefill_mask(pad: torch.Tensor, length: int) -> torch.Tensor:
    """[batch, 1, length, length]: causal, a row's padding (its first pad[b] slots) hidden from
    its real tokens."""
    slots = torch.arange(length, device=pad.device)
    causal = slots[None, :] <= slots[:, None]
    real = slots[None, None, :] >= pad[:, None, None]
    own = slots[None, :] == slots[:, None]
    return ((real | own) & causal)[:, None]


def decode_mask(pad: torch.Tensor, end: int) -> torch.Tensor:
    """[batch, 1, 1, end]: the new token sees its row's slots from the first real one on."""
    return (torch.arange(end, device=pad.device)[None, :] >= pad[:, None])[:, None, None]


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
