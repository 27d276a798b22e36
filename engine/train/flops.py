"""Throughput accounting. FLOPs per token = 6·N + 12·L·h·s, where N counts the non-embedding
parameters plus the LM head (the embedding lookup is no matmul), L layers, h = heads·head_dim,
s the sequence length: 6·N for the forward and backward matmuls, 12·L·h·s for the attention
scores and the weighted sum over the full s×s matrix (causal masking not discounted — the
convention of the PaLM paper and of most published MFU figures)."""

from __future__ import annotations

from engine.model.config import ModelConfig

# Dense bf16 peak per GPU, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12,
                   "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "A10G": 125e12}


def matmul_params(cfg: ModelConfig) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    mlp = 3 * h * cfg.intermediate_size
    return cfg.num_layers * (attn + mlp) + cfg.vocab_size * h


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 6 * matmul_params(cfg) + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def peak_flops(device) -> float | None:
    """The dense bf16 peak of a CUDA device (a torch.device); None for others. Torch is imported
    here only: the planner (engine/plan/) reads this module without it."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
