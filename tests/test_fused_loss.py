"""The performance paths compute what the plain ones do: fused chunked head + cross-entropy vs
full logits, and compiled vs eager blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.model.fused_loss import linear_cross_entropy

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64)


def _plain(hidden, weight, targets, mask):
    logits = F.linear(hidden, weight).float()
    return (F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            * mask.flatten()).sum()


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_fused_loss_and_grads_equal_full_logits(chunk):
    torch.manual_seed(0)
    h = torch.randn(3, 40, 32, requires_grad=True)
    w = torch.randn(97, 32, requires_grad=True)
    t = torch.randint(0, 97, (3, 40))
    m = torch.rand(3, 40) > 0.3
    ref = _plain(h, w, t, m)
    (ref * 0.7).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, t, m, chunk_rows=chunk)
    (out * 0.7).backward()
    assert abs(out.item() - ref.item()) / ref.item() < 1e-6  # fp32 summation order only
    assert torch.allclose(h.grad, gh, atol=1e-5) and torch.allclose(w.grad, gw, atol=1e-5)


def test_compiled_chunk_arithmetic_equals_eager():
    """What CUDA runs by default (each chunk's softmax arithmetic compiled) against eager."""
    torch.manual_seed(2)
    h = torch.randn(2, 50, 32, requires_grad=True)
    w = torch.randn(97, 32, requires_grad=True)
    t, m = torch.randint(0, 97, (2, 50)), torch.rand(2, 50) > 0.2
    results = []
    for compiled in (False, True):
        h.grad = w.grad = None
        out = linear_cross_entropy(h, w, t, m, chunk_rows=64, compiled=compiled)  # 64 + 36 rows
        out.backward()
        with torch.no_grad():
            scored = linear_cross_entropy(h, w, t, m, chunk_rows=64, compiled=compiled)
        results.append((out.item(), scored.item(), h.grad.clone(), w.grad.clone()))
    (a, a_eval, ah, aw), (b, b_eval, bh, bw) = results
    assert abs(a - b) / a < 1e-6 and abs(a_eval - b_eval) / a_eval < 1e-6 and abs(a - a_eval) / a < 1e-6
    assert torch.allclose(ah, bh, atol=1e-5) and torch.allclose(aw, bw, atol=1e-5)


def test_fused_loss_bf16_matches_bf16_logits():
    """In bf16 the fused path rounds where the full-logits path does: logits in bf16, loss in fp32."""
    torch.manual_seed(1)
    h, w = torch.randn(2, 30, 32), torch.randn(97, 32)
    t, m = torch.randint(0, 97, (2, 30)), torch.ones(2, 30, dtype=torch.bool)
    ref = _plain(h.bfloat16(), w.bfloat16(), t, m)
    out = linear_cross_entropy(h.bfloat16(), w, t, m, compute_dtype=torch.bfloat16)
    assert abs(out.item() - ref.item()) / ref.item() < 1e-3


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_path_equals_logits_path(tied):
    model = LlamaModel(CFG.model_copy(update={"tie_word_embeddings": tied}))
    model.init_weights(3)
    ids = torch.randint(0, 97, (2, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    mask = targets != 5
    fused = model(inputs, targets=targets, loss_mask=mask)
    fused.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = _plain(model.forward_hidden(inputs), model.embed.weight if tied else model.lm_head.weight,
                   targets, mask)
    plain.backward()
    assert abs(fused.item() - plain.item()) < 1e-4
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5), n


def test_compiled_blocks_give_eager_losses():
    torch.manual_seed(0)
    cfg = CFG.model_copy(update={"num_layers": 1})  # inductor's C++ build dominates on CPU
    eager = LlamaModel(cfg)
    eager.init_weights(0)
    compiled = LlamaModel(cfg)
    compiled.load_state_dict(eager.state_dict())
    for block in compiled.layers.values():
        block.compile()
    ids = torch.randint(0, 97, (2, 33))
    a = eager(ids[:, :-1], targets=ids[:, 1:])
    b = compiled(ids[:, :-1], targets=ids[:, 1:])
    a.backward()
    b.backward()
    assert abs(a.item() - b.item()) < 1e-4
    ga = dict(eager.named_parameters())
    for n, p in compiled.named_parameters():
        assert torch.allclose(ga[n.replace("_orig_mod.", "")].grad, p.grad, atol=1e-4), n
