"""Knowledge distillation: the chunked loss against full logits, and a run through the loop."""

import pytest
import torch
import torch.nn.functional as F

from engine.model.fused_loss import linear_cross_entropy
from engine.model.kd_loss import TeacherTarget, linear_distillation_loss

V, H, HT, N = 96, 16, 24, 37


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_()
    teacher_hidden = torch.randn(N, HT, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(V, HT, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.2
    return hidden, weight, teacher_hidden, teacher_weight, targets, mask


def _direct(hidden, weight, teacher_hidden, teacher_weight, targets, mask, alpha, tau, top_k):
    """The definition over full logits, by autograd."""
    s, t = hidden @ weight.t(), teacher_hidden @ teacher_weight.t()
    ce = (F.cross_entropy(s, targets, reduction="none") * mask).sum()
    log_q = F.log_softmax(s / tau, dim=-1)
    if top_k is None:
        kl = F.kl_div(log_q, F.log_softmax(t / tau, dim=-1), log_target=True,
                      reduction="none").sum(-1)
    else:
        values, index = (t / tau).topk(top_k, dim=-1)
        log_p = F.log_softmax(values, dim=-1)
        kl = (log_p.exp() * (log_p - log_q.gather(1, index))).sum(-1)
    kd = tau ** 2 * (kl * mask).sum()
    return alpha * ce + (1 - alpha) * kd, ce, kd


@pytest.mark.parametrize("top_k", [None, 5, V])
def test_chunked_kd_equals_full_logits(top_k):
    hidden, weight, th, tw, targets, mask = _inputs()
    alpha, tau = 0.3, 2.0
    loss, parts = linear_distillation_loss(hidden, weight, TeacherTarget(th, tw, alpha, tau, top_k),
                                           targets, mask, chunk_rows=8)
    loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref, ce, kd = _direct(hidden, weight, th, tw, targets, mask, alpha, tau, top_k)
    ref.backward()
    assert torch.allclose(loss.double(), ref, rtol=1e-6), (loss, ref)
    assert torch.allclose(parts.double(), torch.stack((ce, kd)).detach(), rtol=1e-6)
    assert kd > 0
    for a, b in zip(got, (hidden.grad, weight.grad)):
        assert (a - b).abs().max() < 1e-6 * b.abs().max(), (a - b).abs().max()


def test_top_k_of_whole_vocabulary_is_full_kl():
    hidden, weight, th, tw, targets, mask = _inputs(1)
    full = linear_distillation_loss(hidden, weight, TeacherTarget(th, tw, 0.0, 1.5), targets, mask)
    every = linear_distillation_loss(hidden, weight, TeacherTarget(th, tw, 0.0, 1.5, V), targets, mask)
    assert torch.allclose(full[0], every[0], rtol=1e-9)


def test_alpha_one_is_plain_cross_entropy():
    hidden, weight, th, tw, targets, mask = _inputs(2)
    hidden, weight = hidden.float().detach().requires_grad_(), weight.float().detach().requires_grad_()
    loss, parts = linear_distillation_loss(hidden, weight, TeacherTarget(th.float(), tw.float(), 1.0, 2.0),
                                           targets, mask, chunk_rows=16)
    loss.backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ce = linear_cross_entropy(hidden, weight, targets, mask, chunk_rows=16)
    ce.backward()
    assert torch.equal(loss, ce) and torch.equal(parts[0], ce)
    assert torch.equal(got[0], hidden.grad) and torch.equal(got[1], weight.grad)


def test_teacher_tensors_get_no_gradient():
    hidden, weight, th, tw, targets, mask = _inputs(3)
    th.requires_grad_(), tw.requires_grad_()
    loss, _ = linear_distillation_loss(hidden, weight, TeacherTarget(th, tw, 0.5, 1.0), targets, mask)
    loss.backward()
    assert th.grad is None and tw.grad is None and hidden.grad is not None
