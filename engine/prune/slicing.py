"""The pruned model's weights: the source's rows and columns that the plan keeps.

A hidden channel is a column of every matrix that reads the residual stream (embedding, q/k/v,
gate/up, head) and a row of every one that writes it (wo, w_down), and an entry of every norm.
RMSNorm divides by the root mean square over the channels it sees: with fewer channels that
mean changes, so each norm's weight is rescaled by how its input's measured energy changes
(the Cookbook leaves the norms as they were).
"""

from __future__ import annotations

import torch

from engine.model.config import ModelConfig
from engine.prune.plan import Plan


def norm_scales(energy: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Per norm [2L + 1]: rms over the kept channels / rms over all, from the mean energies
    `energy` [2L + 1, H] of its input — the factor that keeps its kept outputs as they were."""
    kept = energy[:, hidden].sum(1) / hidden.numel()
    return (kept / (energy.sum(1) / energy.shape[1])).sqrt()


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rows of a projection that hold `heads`."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def prune_state(state: dict[str, torch.Tensor], source: ModelConfig, plan: Plan,
                scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pruned model's state dict (global names, layers renumbered from 0)."""
    h = plan.hidden
    out = {"embed.weight": state["embed.weight"][:, h],
           "norm.weight": state["norm.weight"][h] * scales[-1]}
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"][:, h]
    for new, old in enumerate(plan.layers):
        src, dst = f"layers.{old}.", f"layers.{new}."
        q = _rows(plan.heads[new], source.head_dim)
        kv = _rows(plan.kv_heads[new], source.head_dim)
        ffn = plan.neurons[new]
        out[dst + "attn_norm.weight"] = state[src + "attn_norm.weight"][h] * scales[2 * old]
        out[dst + "mlp_norm.weight"] = state[src + "mlp_norm.weight"][h] * scales[2 * old + 1]
        for name, rows in (("wq", q), ("wk", kv), ("wv", kv)):
            out[f"{dst}attn.{name}.weight"] = state[f"{src}attn.{name}.weight"][rows][:, h]
            if f"{src}attn.{name}.bias" in state:
                out[f"{dst}attn.{name}.bias"] = state[f"{src}attn.{name}.bias"][rows]
        out[dst + "attn.wo.weight"] = state[src + "attn.wo.weight"][h][:, q]
        for name in ("w_gate", "w_up"):
            out[f"{dst}mlp.{name}.weight"] = state[f"{src}mlp.{name}.weight"][ffn][:, h]
        out[dst + "mlp.w_down.weight"] = state[src + "mlp.w_down.weight"][h][:, ffn]
    return {name: tensor.contiguous() for name, tensor in out.items()}
