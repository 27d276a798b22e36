"""An external attention kernel registered as a custom operator (how flash-attn-4 is wired in)
keeps compiled blocks whole and trains exactly like SDPA. The kernel here is a plain PyTorch
reference with the same contract (out and fp32 log-sum-exp forward, dq/dk/dv backward), so the
wiring is checked on CPU; flash-attn-4 itself is checked against SDPA on GPU
(`python -m bench.profile_step --kernels`)."""

from __future__ import annotations

import torch
import torch._dynamo

from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.model.attention_op import attention_op

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=64)


def _scores(q, k):
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    future = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).triu(1)
    return s.masked_fill(future, float("-inf"))


def _reference(q, k, v):
    groups = q.shape[2] // k.shape[2]
    scores = _scores(q, k)
    lse = scores.logsumexp(-1)
    probs = (scores - lse[..., None]).exp()
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.repeat_interleave(groups, dim=2).float())
    return out.to(q.dtype), lse


def _reference_backward(dout, q, k, v, out, lse):
    """The textbook gradients (custom operators run below autograd), from the saved
    log-sum-exp: P = exp(S − lse), dS = P · (dO Vᵀ − rowsum(dO · O))."""
    groups = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5
    probs = (_scores(q, k) - lse[..., None]).exp()
    dout, vg = dout.float(), v.repeat_interleave(groups, dim=2).float()
    delta = (dout * out.float()).sum(-1).transpose(1, 2)  # [b, h, q]
    dprobs = torch.einsum("bqhd,bkhd->bhqk", dout, vg)
    dscores = probs * (dprobs - delta[..., None]) * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k.repeat_interleave(groups, dim=2).float())
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.float())
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout)

    def per_kv_head(g):  # sum the gradients of the query heads that share a KV head
        return g.unflatten(2, (k.shape[2], groups)).sum(3)

    return dq.to(q.dtype), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)


reference_attention = attention_op("test_reference", _reference, _reference_backward)


def _model(kernel=None):
    model = LlamaModel(CFG)
    model.init_weights(0)
    if kernel is not None:
        for block in model.layers.values():
            block.attn.kernel = kernel
    return model


def test_custom_op_attention_compiles_whole_and_matches_sdpa():
    ids = torch.randint(0, CFG.vocab_size, (2, 25), generator=torch.Generator().manual_seed(0))
    plain, custom = _model(), _model(reference_attention)
    torch._dynamo.reset()
    for block in custom.layers.values():
        block.compile(fullgraph=True)  # a graph break fails here instead of silently splitting
    losses = [m(ids[:, :-1], targets=ids[:, 1:]) for m in (plain, custom)]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) < 1e-4
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in custom.named_parameters():
        assert torch.allclose(p.grad, grads[name.replace("_orig_mod.", "")], atol=1e-5), name


def test_custom_op_declares_the_shapes_it_returns():
    q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    torch.library.opcheck(torch.ops.lmforge.test_reference_fwd.default, (q, k, v),
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.lmforge.test_reference_fwd(q, k, v)
    assert out.shape == (2, 7, 4, 8) and lse.shape == (2, 4, 7) and lse.dtype == torch.float32
