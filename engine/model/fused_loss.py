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


def chunked_head(hidden: torch.Tensor, weight: torch.Tensor, compute_dtype, chunk_rows: int,
                 chunk_fn, need_grad: bool, losses: tuple[int, ...] = ()):
    """The head over row chunks of `hidden` (flattened to [rows, hidden]): `chunk_fn(logits,
    rows)` gives each chunk's fp32 loss sums (shape `losses`) and, if `need_grad`, the gradient
    of the loss with respect to the logits. Returns the summed losses and the gradients of their sum with respect to
    `hidden` (its shape and dtype) and `weight` (its dtype), or None, None."""
    h = hidden.reshape(-1, hidden.shape[-1])
    w = weight.to(compute_dtype)
    grad_h = torch.empty(h.shape, dtype=hidden.dtype, device=h.device) if need_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
    total = torch.zeros(losses, dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        hc = h[rows].to(compute_dtype)
        loss, g = chunk_fn(hc @ w.t(), rows)
        total += loss
        if need_grad:
            grad_h[rows] = (g @ w).to(hidden.dtype)
            grad_w += (g.t() @ hc).float()
    if not need_grad:
        return total, None, None
    return total, grad_h.view(hidden.shape), grad_w.to(weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, mask, chunk_rows: int, compute_dtype, compiled: bool):
        t, m = targets.reshape(-1), mask.reshape(-1).to(torch.float32)
        need_grad = any(ctx.needs_input_grad[:2])  # not under no_grad (evaluation)
        chunk_loss, chunk_loss_and_grad = _chunk_fns(compiled)

        def chunk(logits, rows):
            if need_grad:
                return chunk_loss_and_grad(logits, t[rows], m[rows])
            return chunk_loss(logits, t[rows], m[rows]), None

        total, grad_h, grad_w = chunked_head(hidden, weight, compute_dtype, chunk_rows, chunk,
                                             need_grad)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
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
