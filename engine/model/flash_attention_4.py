"""FlashAttention-4 (the flash-attn-4 package's CuTe kernels, for Hopper and Blackwell GPUs) as
the `flash_attn_4` attention backend: causal, grouped KV heads as they are, the default softmax
scale. On an H200 with the TinyLlama shape (head_dim 64, 4 KV heads, seq 4096) its forward and
backward take 0.80x the time of cuDNN's through SDPA (docs/benchmarks.md).

Importing this module imports flash_attn.cute: an ImportError says the package is missing. The
package's public `flash_attn_func` is an autograd.Function that torch.compile cannot trace, so
its forward and backward functions are registered as one custom operator (attention_op.py);
they are flash-attn-4's internal API, hence the exact version pin in pyproject's `gpu` extra.
"""

from __future__ import annotations

import torch
from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

from engine.model.attention_op import attention_op


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, *_ = _flash_attn_fwd(q, k, v, causal=True, return_lse=True)
    return out, lse


def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, causal=True)
    return dq, dk, dv


flash_attention_4 = attention_op("flash_attn_4", _forward, _backward)
