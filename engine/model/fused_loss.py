"""LM head and cross-entropy in one pass over row chunks, never materialising the full
[tokens, vocab] logits, in fp32 or otherwise.

For each chunk the forward computes the logits (in the compute dtype), the fp32 log-sum-exp, the
masked token losses, and at once the gradients of their sum with respect to the hidden states and
the head weight (softmax − one-hot, times the mask): the loss is the graph's last node, so the
backward only scales what the forward already has. Peak extra memory is one chunk of logits plus a
[vocab, hidden] fp32 gradient, instead of two [tokens, vocab] tensors; no matmul is recomputed.

It is kept out of torch.compile graphs: traced into a whole-model graph on CUDA (torch 2.11) the
head stopped learning (the loss stayed at its initial value). Only each chunk's softmax
arithmetic is compiled, on its own (one fused kernel instead of a dozen passes over fp32 logits).
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor


def _lse_and_loss(logits: torch.Tensor, targets: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk's fp32 logits, their log-sum-exp, and the sum of its masked token losses."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(1, targets[:, None]).squeeze(1)
    return x, lse, ((lse - target_logit) * mask).sum()


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the masked token losses of one chunk, in fp32."""
    return _lse_and_loss(logits, targets, mask)[2]


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's loss sum and its gradient with respect to the logits, (softmax − one-hot) ·
    mask, in the logits' dtype. One fused kernel once compiled: the fp32 logits never reach
    memory."""
    x, lse, loss = _lse_and_loss(logits, targets, mask)
    columns = torch.arange(x.shape[1], device=x.device)
    grad = (torch.exp(x - lse[:, None]) - (columns[None, :] == targets[:, None]).float()) * mask[:, None]
    return loss, grad.to(logits.dtype)


@functools.cache
def _compiled_chunk_fns():
    return torch.compile(_chunk_loss, dynamic=False), torch.compile(_chunk_loss_and_grad, dynamic=False)


def _chunk_fns(compiled: bool):
    """The chunk functions, eager or compiled once per process (compiled by default on CUDA,
    where the step's time goes; on CPU inductor's build would cost more than it saves)."""
    return _compiled_chunk_fns() if compiled else (_chunk_loss, _chunk_loss_and_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, chunk_rows: int, compute_dtype, compiled: bool):
        h = hidden.reshape(-1, hidden.shape[-1])
        t, m = targets.reshape(-1), mask.reshape(-1).to(torch.float32)
        w = weight.to(compute_dtype)
        need_grad = any(ctx.needs_input_grad[:2])  # not under no_grad (evaluation)
        chunk_loss, chunk_loss_and_grad = _chunk_fns(compiled)
        grad_h = torch.empty(h.shape, dtype=hidden.dtype, device=h.device) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            hc = h[start:start + chunk_rows].to(compute_dtype)
            logits = hc @ w.t()
            tc, mc = t[start:start + chunk_rows], m[start:start + chunk_rows]
            if not need_grad:
                total += chunk_loss(logits, tc, mc)
                continue
            loss, g = chunk_loss_and_grad(logits, tc, mc)
            total += loss
            grad_h[start:start + chunk_rows] = (g @ w).to(hidden.dtype)
            grad_w += (g.t() @ hc).float()
        if need_grad:
            ctx.save_for_backward(grad_h.view(hidden.shape), grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_total.to(grad_h.dtype), grad_w * grad_total.to(grad_w.dtype),
                None, None, None, None, None)


@torch.compiler.disable  # runs eagerly, also inside a compiled model: see the module docstring
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         mask: torch.Tensor, chunk_rows: int = 4096,
                         compute_dtype: torch.dtype | None = None,
                         compiled: bool | None = None) -> torch.Tensor:
    """sum over tokens of mask · cross_entropy(hidden @ weightᵀ, target), as an fp32 scalar.

    `compute_dtype` is the matmul dtype (default: the hidden states'); log-sum-exp and the loss are
    always fp32, as in an fp32 cross-entropy over full logits. `compiled` fuses each chunk's
    softmax arithmetic into one kernel (default: on CUDA). A weight that tensor parallelism
    sharded over the vocabulary goes to engine/model/vocab_parallel_loss.py."""
    if isinstance(weight, DTensor):
        from engine.model.vocab_parallel_loss import vocab_parallel_cross_entropy  # imports this

        return vocab_parallel_cross_entropy(hidden, weight, targets, mask, chunk_rows,
                                            compute_dtype or hidden.dtype)
    if compiled is None:
        compiled = hidden.is_cuda
    return _LinearCrossEntropy.apply(hidden, weight, targets, mask, chunk_rows,
                                     compute_dtype or hidden.dtype, compiled)
