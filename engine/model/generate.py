"""Greedy decoding, for checks against reference outputs (not for serving)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate_greedy(model: nn.Module, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Append the most likely next token `max_new_tokens` times to ids [batch, seq]. The whole
    prefix is recomputed at each step (no KV cache): simple, and the same computation as
    training."""
    for _ in range(max_new_tokens):
        next_ids = model(ids)[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat((ids, next_ids), dim=1)
    return ids
