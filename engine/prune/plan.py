"""What stays: the layers, hidden channels, heads and neurons kept, chosen from importance scores.

Heads are chosen the GQA way: KV groups by the summed importance of their query heads, then
within each kept group its most important query heads, the same count in every group. Under
`balance` each tensor-parallel rank's contiguous slice of groups and neurons keeps the same
count (the Cookbook's meaning; a rank's slice then holds exactly the units it held before);
`unbalance` takes the best over the whole layer. Indices are kept in their original order, so
pruning that keeps everything is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.model.config import ModelConfig
from engine.prune.importance import Width


@dataclass
class Plan:
    layers: list[int]               # source layers kept, in order
    hidden: torch.Tensor            # hidden channels kept
    kv_heads: list[torch.Tensor]    # per kept layer: its KV heads kept
    heads: list[torch.Tensor]       # per kept layer: its query heads kept
    neurons: list[torch.Tensor]     # per kept layer: its FFN neurons kept

    def record(self, source: ModelConfig) -> dict[str, Any]:
        """The indices kept and removed, as JSON (pruning/plan.json)."""
        def per_layer(kept: list[torch.Tensor]) -> dict[str, list[int]]:
            return {str(layer): idx.tolist() for layer, idx in zip(self.layers, kept)}

        return {"layers_kept": self.layers,
                "layers_removed": [i for i in range(source.num_layers) if i not in self.layers],
                "hidden_kept": self.hidden.tolist(), "kv_heads_kept": per_layer(self.kv_heads),
                "heads_kept": per_layer(self.heads), "neurons_kept": per_layer(self.neurons)}


def top(scores: torch.Tensor, keep: int, parts: int = 1) -> torch.Tensor:
    """Indices of the `keep` highest scores, ascending; with `parts` > 1, keep / parts from
    each of `parts` equal contiguous slices."""
    size = scores.numel() // parts
    chosen = [torch.topk(scores[p * size:(p + 1) * size], keep // parts).indices + p * size
              for p in range(parts)]
    return torch.cat(chosen).sort().values


def kept_layers(source: ModelConfig, drop: list[int]) -> list[int]:
    """The source layers that stay when `drop` go."""
    return [i for i in range(source.num_layers) if i not in set(drop)]


def make_plan(source: ModelConfig, target: ModelConfig, width: Width, layers: list[int],
              parts: int) -> Plan:
    """The plan for `layers`, with `parts` tensor-parallel slices kept alike (1: unbalance)."""
    group = source.num_heads // source.num_kv_heads
    per_group = target.num_heads // target.num_kv_heads
    kv_heads, heads, neurons = [], [], []
    for layer in layers:
        scores = width.heads[layer].view(source.num_kv_heads, group)
        groups = top(scores.sum(1), target.num_kv_heads, parts)
        kv_heads.append(groups)
        heads.append(torch.cat([top(scores[g], per_group) + g * group for g in groups.tolist()]))
        neurons.append(top(width.neurons[layer], target.intermediate_size, parts))
    return Plan(layers, top(width.hidden, target.hidden_size), kv_heads, heads, neurons)
