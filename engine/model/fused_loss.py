"""LM head and cross-entropy in one pass over row chunks, never materialising the full
[tokens, vocab] logits, in fp32 or otherwise.

For each chunk the forward computes the logits (in the compute dtype), the fp32 log-sum-exp, the
masked token losses, and at once the gradients of their sum with respect to the hidden states and
the head weight (softmax − one-hot, times the mask): the loss is the graph's last node, so the
backward only scales what the forward already has. Peak extra memory is one chunk of logits plus a
[vocab, hidden] fp32 gradient, instead of two [tokens, vocab] tensors; no matmul is recomputed.

It is kept out of torch.compile graphs: traced into a whole-model graph on CUDA (torch 2.11) the
head stopped learning (the loss stayed at its initial value), and its chunk loop gains nothing
from compilation.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, chunk_rows: int, compute_dtype):
        h = hidden.reshape(-1, hidden.shape[-1])
        t, m = targets.reshape(-1), mask.reshape(-1).to(torch.float32)
        w = weight.to(compute_dtype)
        need_grad = any(ctx.needs_input_grad[:2])  # not under no_grad (evaluation)
        grad_h = torch.empty(h.shape, dtype=hidden.dtype, device=h.device) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            hc = h[start:start + chunk_rows].to(compute_dtype)
            logits = (hc @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            tc, mc = t[start:start + chunk_rows], m[start:start + chunk_rows]
            target_logit = logits.gather(1, tc[:, None]).squeeze(1)
            total += ((lse - target_logit) * mc).sum()
            if not need_grad:
                continue
            probs = torch.exp(logits - lse[:, None])  # d(sum of losses)/d(logits)
            probs[torch.arange(len(tc), device=tc.device), tc] -= 1.0
            probs *= mc[:, None]
            g = probs.to(compute_dtype)
            grad_h[start:start + chunk_rows] = (g @ w).to(hidden.dtype)
            grad_w += (g.t() @ hc).float()
        if need_grad:
            ctx.save_for_backward(grad_h.view(hidden.shape), grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), grad_w * grad_total.to(grad_w.dtype), None, None, None, None


@torch.compiler.disable  # runs eagerly, also inside a compiled model: see the module docstring
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor, chunk_rows: int = 4096,
                         compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum over tokens of mask · cross_entropy(hidden @ weightᵀ, target), as an fp32 scalar.

    `compute_dtype` is the matmul dtype (default: the hidden states'); log-sum-exp and the loss are
    always fp32, as in an fp32 cross-entropy over full logits."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, mask, chunk_rows,
                                     compute_dtype or hidden.dtype)
