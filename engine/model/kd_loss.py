"""Knowledge distillation loss, chunked like engine/model/fused_loss.py: for each chunk of tokens
both models' logits are computed from their final hidden states and head weights, the student's
cross-entropy and its KL divergence from the teacher at temperature τ are summed, and the
gradients with respect to the student's hidden states and head weight are formed in the same
pass. Neither model's [tokens, vocab] logits ever exist whole.

    loss = α · CE + (1 − α) · τ² · KL(p_T ‖ q_S),   p_T = softmax(t / τ),  q_S = softmax(s / τ)

summed over the masked tokens (the loop divides by their count). τ² keeps the KL gradient, which
is (q_S − p_T) / τ per logit, on the scale of the CE gradient as τ changes (Hinton et al.).

With `top_k` the teacher's distribution is its k largest logits renormalised, p_k = softmax over
those k of t / τ (zero elsewhere), and the term is Σ_{i ∈ top-k} p_k,i (log p_k,i − log q_S,i)
with q_S the student's full-vocabulary distribution ("sparse KD"): the student is pulled toward
the teacher's top k and away from every other token; with k = vocab it is the full KL.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from engine.model.fused_loss import _lse_and_loss, chunked_head


@dataclass
class TeacherTarget:
    """What the student's loss needs of the teacher for one micro-batch, and how to weigh it."""

    hidden: torch.Tensor   # the teacher's final-normed hidden states [batch, seq, hidden_T]
    weight: torch.Tensor   # its head weight [vocab, hidden_T]
    alpha: float
    temperature: float
    top_k: int | None = None


def _teacher_probs(teacher_logits: torch.Tensor, temperature: float,
                   top_k: int | None) -> torch.Tensor:
    """p_T over the vocabulary in fp32: the full softmax at τ, or its top k renormalised."""
    t = teacher_logits.float() / temperature
    if top_k is None:
        return torch.softmax(t, dim=-1)
    values, index = t.topk(top_k, dim=-1)
    return torch.zeros_like(t).scatter_(1, index, torch.softmax(values, dim=-1))


def _kd_chunk(logits, teacher_logits, targets, mask, alpha: float, temperature: float,
              top_k: int | None, need_grad: bool):
    """The chunk's [CE sum, τ²·KL sum] (fp32) and, if asked, the gradient of
    α·CE + (1 − α)·τ²·KL with respect to the student's logits, in their dtype."""
    x, lse, ce = _lse_and_loss(logits, targets, mask)
    p = _teacher_probs(teacher_logits, temperature, top_k)
    log_q = torch.log_softmax(x / temperature, dim=-1)
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)  # 0 · log 0 = 0 outside the top k
    sums = torch.stack((ce, temperature ** 2 * (kl * mask).sum()))
    if not need_grad:
        return sums, None
    columns = torch.arange(x.shape[1], device=x.device)
    grad_ce = torch.exp(x - lse[:, None]) - (columns[None, :] == targets[:, None]).float()
    grad_kd = temperature * (torch.exp(log_q) - p)
    grad = (alpha * grad_ce + (1 - alpha) * grad_kd) * mask[:, None]
    return sums, grad.to(logits.dtype)


@functools.cache
def _compiled_kd_chunk():
    return torch.compile(_kd_chunk, dynamic=False)


class _LinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, mask,
                alpha: float, temperature: float, top_k: int | None, chunk_rows: int,
                compute_dtype, compiled: bool):
        t, m = targets.reshape(-1), mask.reshape(-1).to(torch.float32)
        th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        tw = teacher_weight.to(compute_dtype)
        need_grad = any(ctx.needs_input_grad[:2])
        kd_chunk = _compiled_kd_chunk() if compiled else _kd_chunk

        def chunk(logits, rows):
            teacher_logits = th[rows].to(compute_dtype) @ tw.t()
            return kd_chunk(logits, teacher_logits, t[rows], m[rows], alpha, temperature,
                             top_k, need_grad)

        parts, grad_h, grad_w = chunked_head(hidden, weight, compute_dtype, chunk_rows, chunk,
                                             need_grad, losses=(2,))
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(parts)
        return alpha * parts[0] + (1 - alpha) * parts[1], parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype),
                None, None, None, None, None, None, None, None, None, None)


@torch.compiler.disable  # runs eagerly, as the fused cross-entropy (see its module docstring)
def linear_distillation_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher: TeacherTarget,
                             targets: torch.Tensor, mask: torch.Tensor, chunk_rows: int = 4096,
                             compute_dtype: torch.dtype | None = None,
                             compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(α·CE + (1 − α)·τ²·KL summed over the masked tokens, an fp32 scalar that carries the
    gradients to `hidden` and `weight`; its two sums [CE, τ²·KL], detached). The teacher's
    tensors get no gradient. `compute_dtype` is both heads' matmul dtype (default: the student's
    hidden states'); the softmaxes and sums are fp32. `compiled` fuses each chunk's arithmetic
    as the fused cross-entropy does on CUDA; off by default until measured on a GPU
    (bench/kd_loss.py; on CPU it equals eager within fp32 rounding)."""
    if isinstance(weight, DTensor) or isinstance(teacher.weight, DTensor):
        raise ValueError("distillation under tensor parallelism (a vocabulary-sharded head) is "
                         "not supported")
    if teacher.weight.shape[0] != weight.shape[0]:
        raise ValueError(f"teacher vocabulary {teacher.weight.shape[0]} differs from the "
                         f"student's {weight.shape[0]}")
    return _LinearDistillation.apply(hidden, weight, teacher.hidden.detach(),
                                     teacher.weight.detach(), targets, mask, teacher.alpha,
                                     teacher.temperature, teacher.top_k, chunk_rows,
                                     compute_dtype or hidden.dtype, compiled)
