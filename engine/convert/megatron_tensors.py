"""Our parameters <-> Megatron's tensors, whole (TP 1) and split over tensor-parallel ranks.

- QKV is one tensor grouped per query group, [q x heads-per-group, k, v] for each group, so a
  plain split on dim 0 gives each rank whole groups.
- fc1 stacks [gate; up]; under TP each rank holds [gate_r; up_r] (its slice of both), so it is
  split half by half. EPFL Megatron-LLM stacks [up; gate] (`upgate`).
- Column-parallel weights (QKV, fc1, the head) split on dim 0, row-parallel ones (proj, fc2) on
  dim 1, the embedding and the head on the (padded) vocabulary; norms are whole on every rank.
- EPFL stores RoPE in the interleaved form: within each q / k head the rows that rotate together
  are adjacent (0, d/2, 1, d/2+1, ...), where ours (HF's) pairs the first half with the second.
"""

from __future__ import annotations

import torch

from engine.model.config import ModelConfig

Parts = dict[tuple[int | None, str], torch.Tensor]  # (layer or None, part) -> whole tensor
SPLIT = {"embed": "vocab", "output": "vocab", "final_norm": "whole", "attn_norm": "whole",
         "mlp_norm": "whole", "qkv": "column", "qkv_bias": "column", "proj": "row",
         "fc1": "gated", "fc2": "row"}
_OURS = {"attn_norm": "attn_norm.weight", "proj": "attn.wo.weight", "mlp_norm": "mlp_norm.weight",
         "fc2": "mlp.w_down.weight"}


def to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    rest = w.shape[1:]
    return w.reshape(heads, 2, -1, *rest).transpose(1, 2).reshape(w.shape)


def from_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    rest = w.shape[1:]
    return w.reshape(heads, -1, 2, *rest).transpose(1, 2).reshape(w.shape)


def group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def ungroup_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    groups, d = cfg.num_kv_heads, cfg.head_dim
    per_group = cfg.num_heads // groups * d
    rest = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, per_group + 2 * d, *rest).split([per_group, d, d], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))


def to_parts(state: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int,
             epfl: bool = False) -> Parts:
    """Our state dict as Megatron's whole tensors; the vocabulary zero-padded to `padded_vocab`
    (Megatron computes logits for the padding rows too: zero rows give them logit 0)."""
    def pad(w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])])

    parts: Parts = {(None, "embed"): pad(state["embed.weight"]),
                    (None, "final_norm"): state["norm.weight"]}
    if not cfg.tie_word_embeddings:
        parts[None, "output"] = pad(state["lm_head.weight"])
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for part, ours in _OURS.items():
            parts[i, part] = state[p + ours]
        for kind, part in (("weight", "qkv"), ("bias", "qkv_bias")):
            if p + f"attn.wq.{kind}" not in state:
                continue
            q, k = state[p + f"attn.wq.{kind}"], state[p + f"attn.wk.{kind}"]
            if epfl:
                q, k = to_interleaved(q, cfg.num_heads), to_interleaved(k, cfg.num_kv_heads)
            parts[i, part] = group_qkv(q, k, state[p + f"attn.wv.{kind}"], cfg.num_kv_heads)
        gate, up = state[p + "mlp.w_gate.weight"], state[p + "mlp.w_up.weight"]
        parts[i, "fc1"] = torch.cat([up, gate] if epfl else [gate, up])
    return parts


def from_parts(parts: Parts, cfg: ModelConfig, epfl: bool = False) -> dict[str, torch.Tensor]:
    """Megatron's whole tensors as our state dict, the vocabulary padding cut off."""
    vocab = cfg.vocab_size
    state = {"embed.weight": parts[None, "embed"][:vocab], "norm.weight": parts[None, "final_norm"]}
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = parts[None, "output"][:vocab]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for part, ours in _OURS.items():
            state[p + ours] = parts[i, part]
        for kind, part in (("weight", "qkv"), ("bias", "qkv_bias")):
            if (i, part) not in parts:
                continue
            q, k, v = ungroup_qkv(parts[i, part], cfg)
            if epfl:
                q, k = from_interleaved(q, cfg.num_heads), from_interleaved(k, cfg.num_kv_heads)
            state[p + f"attn.wq.{kind}"], state[p + f"attn.wk.{kind}"] = q, k
            state[p + f"attn.wv.{kind}"] = v
        first, second = parts[i, "fc1"].chunk(2)
        gate, up = (second, first) if epfl else (first, second)
        state[p + "mlp.w_gate.weight"], state[p + "mlp.w_up.weight"] = gate, up
    return {name: t.contiguous() for name, t in state.items()}


def split(tensor: torch.Tensor, part: str, ranks: int) -> list[torch.Tensor]:
    """One tensor per tensor-parallel rank."""
    how = SPLIT[part]
    if how == "whole":
        return [tensor] * ranks
    if how == "row":
        return [t.contiguous() for t in tensor.chunk(ranks, dim=1)]
    if how == "gated":
        first, second = tensor.chunk(2)
        return [torch.cat(pair) for pair in zip(first.chunk(ranks), second.chunk(ranks))]
    return [t.contiguous() for t in tensor.chunk(ranks)]


def merge(shards: list[torch.Tensor], part: str) -> torch.Tensor:
    """The whole tensor from the tensor-parallel ranks' shards (inverse of `split`)."""
    how = SPLIT[part]
    if how == "whole":
        return shards[0]
    if how == "row":
        return torch.cat(shards, dim=1)
    if how == "gated":
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards)
