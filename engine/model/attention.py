"""Causal self-attention with grouped KV heads: projections, RoPE, and one of four kernels.

Tensors stay in [batch, seq, heads, head_dim] between projections and kernel, and head counts are
read from the tensors (`view(b, s, -1, head_dim)`), so tensor parallelism can shard the
projections by heads from outside without this code knowing.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import SpecError
from engine.model.config import ModelConfig
from engine.model.rope import apply_rope

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's fused kernels (flash / cuDNN / memory-efficient / CPU). GQA is passed through
    `enable_gqa` (every supported torch has it) only when heads differ: some kernels refuse it.
    `mask`: a causal bias for fewer queries than keys (context parallelism's chunks:
    `causal_lower_right`), made by the caller, since selective recompute's dispatch mode cannot
    create one; None: causal over square q and k."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, is_causal=mask is None,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The textbook computation, softmax in fp32: a reference for the fused kernels."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    seq = q.shape[1]
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1, dtype=torch.float32)
    return torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)


def _flash_attn_kernel() -> Kernel:
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise SpecError("attention_backend 'flash_attn' needs the flash-attn package "
                        "(pip install .[gpu])") from None

    def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """flash-attn takes [batch, seq, heads, head_dim] and grouped KV heads as they are."""
        return flash_attn_func(q, k, v, causal=True)

    return flash_attention


def _flash_attn_4_kernel() -> Kernel:
    """(The head_dims its kernels take are checked with the model config.)"""
    try:
        from engine.model.flash_attention_4 import flash_attention_4
    except ImportError:
        raise SpecError("attention_backend 'flash_attn_4' needs the flash-attn-4 package "
                        "(pip install .[gpu]) and a Hopper or Blackwell GPU") from None
    return flash_attention_4


def attention_kernel(backend: str) -> Kernel:
    """The kernel for `ModelConfig.attention_backend`; an error that says what to install if the
    chosen one is unavailable."""
    if backend == "sdpa":
        return sdpa_attention
    if backend == "eager":
        return eager_attention
    if backend == "flash_attn":
        return _flash_attn_kernel()
    if backend == "flash_attn_4":
        return _flash_attn_4_kernel()
    raise SpecError(f"unknown attention_backend {backend!r} (sdpa, flash_attn, flash_attn_4, eager)")


class Attention(nn.Module):
    """q/k/v projections (biased for Qwen2), RoPE on q and k, causal attention, output
    projection. The projections stay three GEMMs: one over the stacked weights measured 1.2%
    slower a training step (its backward's RoPE-and-concatenate kernel costs more than the wider
    GEMM saves), k and v as one, or q/k/v grouped per KV head, 0.4–0.5% slower
    (docs/benchmarks.md)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.hidden_size, q_size, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_size, cfg.hidden_size, bias=False)
        self.kernel = attention_kernel(cfg.attention_backend)
        # decoding installs a KV cache here from outside (engine.generate.cache): a callable
        # (q, k, v) -> out that stores k and v and attends over everything stored so far
        self.cache: Kernel | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        kernel = self.kernel if self.cache is None else self.cache
        out = kernel(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return self.wo(out.reshape(batch, seq, -1))
