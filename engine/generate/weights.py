"""Weights prepared once for a decoding run, while they cannot change: SwiGLU's gate and up
weights stacked once instead of at every step (on Llama-3-8B, restacking them was 17% of a decode
step's device time: docs/benchmarks.md)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from engine.model.llama import SwiGLU


@contextmanager
def stacked_mlp_weights(model: nn.Module) -> Iterator[None]:
    mlps = [m for m in model.modules() if isinstance(m, SwiGLU)]
    for mlp in mlps:
        mlp.stacked = mlp.stacked_weight()
    try:
        yield
    finally:
        for mlp in mlps:
            mlp.stacked = None
