"""An external attention kernel (forward returning the output and its log-sum-exp, backward
returning dq, dk, dv) as a PyTorch custom operator with autograd.

torch.compile cannot trace into kernels written outside PyTorch (flash-attn-4's CuTe kernels
JIT-compile on first call): called directly, each compiled block would break its graph in two at
attention. As a custom operator the kernel is one opaque node whose output shapes are declared
here, so a block stays one graph, forward and backward.

Tensors are [batch, seq, heads, head_dim]; the log-sum-exp is fp32 [batch, heads, seq]; outputs
are contiguous (the declared shapes say so).
"""

from __future__ import annotations

from typing import Callable

import torch

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Backward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def attention_op(name: str, forward: Forward,
                 backward: Backward) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Register `lmforge::{name}_fwd` and `_bwd` and return causal attention (q, k, v) -> out.

    `forward(q, k, v) -> (out, lse)`; `backward(dout, q, k, v, out, lse) -> (dq, dk, dv)`."""

    @torch.library.custom_op(f"lmforge::{name}_fwd", mutates_args=())
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = forward(q, k, v)
        return out.contiguous(), lse.contiguous()

    @fwd.register_fake
    def _(q, k, v):
        batch, seq, heads, _ = q.shape
        return (q.new_empty(batch, seq, heads, v.shape[-1]),
                q.new_empty(batch, heads, seq, dtype=torch.float32))

    @torch.library.custom_op(f"lmforge::{name}_bwd", mutates_args=())
    def bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(g.contiguous() for g in backward(dout, q, k, v, out, lse))

    @bwd.register_fake
    def _(dout, q, k, v, out, lse):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)

    def backward_rule(ctx, dout, _dlse):  # the log-sum-exp is not used downstream
        q, k, v, out, lse = ctx.saved_tensors
        return bwd(dout, q, k, v, out, lse)

    fwd.register_autograd(backward_rule, setup_context=setup_context)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fwd(q, k, v)[0]

    return attention
