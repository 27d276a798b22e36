"""MasterAdamW (`precision: bf16-master`): torch.optim.AdamW's update on fp32 masters, bf16 matrices
rounded from them (those kept fp32 left alone), micro-batch gradients summed in fp32, compiled = eager, checkpoints through the
masters, and DDP's fp32 reduction of bf16 gradients."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.parallel.data_parallel import wrap_ddp
from engine.parallel.layout import Layout
from engine.parallel.mesh import build_mesh
from engine.train.master_adamw import MasterAdamW, total_norm


def _params(dtype_seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(dtype_seed)
    return [torch.nn.Parameter(torch.randn(16, 8, generator=g)), torch.nn.Parameter(torch.randn(8, generator=g))]


def _groups(params):
    return [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(16, 8, generator=g), torch.randn(8, generator=g)]


@pytest.mark.parametrize("compile", [False, True])
def test_fp32_masters_follow_torch_adamw(compile):
    """With fp32 weights (no rounding) every step equals torch.optim.AdamW's, through learning-rate
    changes, two weight-decay groups and a gradient scale (clipping's coefficient)."""
    ref, ours = _params(), _params()
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    opt = MasterAdamW(_groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, dtype=torch.float32,
                      compile=compile)
    for step in range(6):
        lr, scale = 1e-2 / (step + 1), 0.5 if step % 2 else 1.0
        for o in (ref_opt, opt):
            for group in o.param_groups:
                group["lr"] = lr
        for p, g in zip(ref, _grads(step)):
            p.grad = g * scale
        for p, g in zip(ours, _grads(step)):
            p.grad = g.clone()
        ref_opt.step()
        opt.step(grad_scale=torch.tensor(scale))
        for a, b in zip(ref, ours):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)
    assert [k for k in opt.state[ours[0]]] == [k for k in ref_opt.state[ref[0]]]


@pytest.mark.parametrize("compile", [False, True])
def test_bf16_weights_are_the_rounded_masters(compile):
    """The model sees bf16 weights (but those kept fp32: their own masters); the update
    happens on fp32 masters from the bf16 gradients, as torch.optim.AdamW updates fp32 weights
    from those gradients."""
    ref, ours = _params(), _params()
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-3, foreach=False)
    opt = MasterAdamW(_groups(ours), lr=1e-3, keep_fp32=ours[1:], compile=compile)
    assert [p.dtype for p in ours] == [torch.bfloat16, torch.float32]
    assert opt.masters[ours[1]] is ours[1]
    for step in range(4):
        grads = [g.bfloat16() for g in _grads(step)]
        for p, g in zip(ref, grads):
            p.grad = g.float()
        for p, g in zip(ours, grads):
            p.grad = g.to(p.dtype)
        ref_opt.step()
        opt.step()
    for a, b in zip(ref, ours):
        torch.testing.assert_close(opt.masters[b], a.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(b.detach(), a.detach().to(b.dtype))
    # a step of lr 1e-3 moves a weight of ~1 by less than bf16's spacing: only the master keeps it
    assert not torch.equal(opt.masters[ours[0]], opt.masters[ours[0]].bfloat16().float())


def test_micro_batch_gradients_add_up_in_fp32():
    """1 + 3 · 2⁻⁹: in bf16 each 2⁻⁹ would round away (bf16 spacing at 1 is 2⁻⁷)."""
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = MasterAdamW([p])
    for g in (1.0, 2.0 ** -9, 2.0 ** -9):
        p.grad = torch.full((2, 2), g, dtype=torch.bfloat16)
        opt.accumulate_grads()
        assert p.grad is None
    p.grad = torch.full((2, 2), 2.0 ** -9, dtype=torch.bfloat16)  # the last micro-batch stays
    (summed,) = opt.grads()
    assert summed.dtype == torch.float32 and summed.flatten().tolist() == [1 + 3 * 2.0 ** -9] * 4
    assert total_norm([summed]).item() == pytest.approx(2 * (1 + 3 * 2.0 ** -9))
    opt.zero_grad()
    assert opt.grads() == []


def test_masters_in_model_for_checkpoints():
    """Inside: the parameters are the fp32 masters (what a checkpoint saves, what a load writes);
    after: bf16 again, rounded from the masters as the load left them."""
    params = _params()
    opt = MasterAdamW(params, keep_fp32=params[1:])
    with opt.masters_in_model():
        assert all(p.dtype == torch.float32 for p in params)
        with torch.no_grad():
            params[0].copy_(torch.full_like(params[0], 1 + 2.0 ** -12))  # what a load does
            params[1].copy_(torch.full_like(params[1], 1 + 2.0 ** -12))
    assert [p.dtype for p in params] == [torch.bfloat16, torch.float32]
    assert torch.equal(opt.masters[params[0]], torch.full((16, 8), 1 + 2.0 ** -12))
    assert torch.equal(params[0].detach(), torch.ones(16, 8, dtype=torch.bfloat16))
    assert torch.equal(params[1].detach(), torch.full((8,), 1 + 2.0 ** -12))


def test_refuses_low_precision_parameters():
    with pytest.raises(ValueError, match="fp32 parameters"):
        MasterAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))])


def _ddp_rank(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=3)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4, bias=False)
    MasterAdamW(model.parameters())
    local = torch.nn.Linear(8, 4, bias=False).bfloat16()
    local.weight.data.copy_(model.weight.data)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(rank)).bfloat16()
    local(x).float().square().sum().backward()
    mesh = build_mesh(Layout(dp_replicate=3), torch.device("cpu"))
    ddp = wrap_ddp(model, "ddp", mesh, torch.device("cpu"))
    ddp(x).float().square().sum().backward()
    unhidden = torch.nn.Linear(8, 4, bias=False).bfloat16()
    unhidden.weight.data.copy_(model.weight.data)
    waited = wrap_ddp(unhidden, "ddp", mesh, torch.device("cpu"), overlap=False)
    waited(x).float().square().sum().backward()
    grads = [torch.empty_like(local.weight.grad) for _ in range(3)]
    dist.all_gather(grads, local.weight.grad)
    expected = (sum(g.float() for g in grads) / 3).bfloat16()
    # several micro-batches: each rank's fp32 sum, then one fp32 mean over the ranks
    summed = torch.nn.Parameter(torch.zeros(4, 8))
    opt = MasterAdamW([summed, torch.nn.Parameter(torch.zeros(2))])  # the second gets no gradient
    micro = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(10 + rank)).bfloat16()
    for g in micro:
        summed.grad = g.clone()
        opt.accumulate_grads()
    opt.all_reduce_grads()
    sums = [torch.empty(4, 8) for _ in range(3)]
    dist.all_gather(sums, micro.float().sum(0))
    (reduced,) = opt.grads()
    out.put((rank, model.weight.grad.dtype, torch.equal(model.weight.grad, expected),
             torch.equal(grads[0], grads[1]), torch.equal(reduced, sum(sums) / 3),
             torch.equal(unhidden.weight.grad, expected),
             [hook.__name__ for hook, _ in ddp._comm_hooks + waited._comm_hooks]))
    dist.destroy_process_group()


def test_ddp_averages_bf16_gradients_in_fp32():
    """Over 3 ranks, DDP's own bf16 mean (each gradient divided by 3 and summed in bf16) differs
    from the fp32 mean rounded once in some elements of these gradients; so does the hook the
    backward waits for (overlap_grad_reduce false). Sums of several micro-batches are reduced
    by MasterAdamW itself, as one fp32 mean."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, out)) for r in range(3)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [r[1:3] for r in results] == [(torch.bfloat16, True)] * 3
    assert [r[4] for r in results] == [True] * 3
    assert [r[5] for r in results] == [True] * 3, "without overlap: the same fp32 mean"
    assert results[0][6] == ["_fp32_mean", "waited"]  # the switch reaches DDP
    assert not results[0][3], "the ranks' own gradients differ, so the mean is a real reduction"
