"""Pipeline parallelism (engine/parallel/pipeline.py): stage split and schedule rules, stages built
on the meta device, and every schedule trained over 2 gloo processes against one process."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback

import numpy as np
import pytest
import torch

from engine.parallel.grad_norm import clip_grad_norm_
from engine.errors import SpecError
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.parallel import pipeline as pp
from engine.parallel.layout import stage_ids

CFG = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
           num_kv_heads=2, max_position_embeddings=64)
SEED, STEPS, BATCH, SEQ, LR, CLIP = 3, 10, 8, 16, 1e-2, 0.5


def _meta_model(**overrides) -> LlamaModel:
    with torch.device("meta"):
        return LlamaModel(ModelConfig(**{**CFG, **overrides}))


# ---- stage split and schedule rules (no processes) ----

def test_split_even_and_remainder_to_middle_then_first():
    assert pp.split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert [len(r) for r in pp.split_layers(10, 4)] == [2, 3, 3, 2]  # the middle stages
    assert [len(r) for r in pp.split_layers(11, 4)] == [3, 3, 3, 2]  # then the first
    assert [len(r) for r in pp.split_layers(5, 2)] == [3, 2]  # never the last (head + loss)
    assert pp.split_layers(4, 1) == [range(0, 4)]


def test_split_uneven_and_its_errors():
    assert pp.split_layers(4, 2, [3, 1]) == [range(0, 3), range(3, 4)]
    with pytest.raises(SpecError, match=r"\[2, 1\] .* sum to the model's 4 layers .*sum to 3"):
        pp.split_layers(4, 2, [2, 1])
    with pytest.raises(SpecError, match=r"\[4, 0\] must be at least 1"):
        pp.split_layers(4, 2, [4, 0])
    with pytest.raises(SpecError, match=r"names 3 stages; the pipeline has 2"):
        pp.split_layers(4, 2, [2, 1, 1])
    with pytest.raises(SpecError, match="4 layers cannot make 5 pipeline stages"):
        pp.split_layers(4, 5)


def test_stage_ids_match_torchs_placement():
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    for schedule, style, virtual in [("interleaved-1f1b", "loop", 3), ("zbv", "v", 2)]:
        mapping = generate_stage_to_rank_mapping(4, 4 * virtual, style=style)
        for rank in range(4):
            ids = stage_ids(schedule, rank, 4, virtual)
            assert ids == sorted(s for s, r in mapping.items() if r == rank)
    assert stage_ids("zbv", 1, 4, 2) == [1, 6]
    assert stage_ids("1f1b", 2, 4) == [2]


@pytest.mark.parametrize("args, message", [
    (("gpipe", 2, 2, 4), "runs one stage per rank, not virtual=2"),
    (("interleaved-1f1b", 2, 1, 4), r"needs virtual ≥ 2 stages per rank, not 1"),
    (("zbv", 2, 3, 4), "needs exactly virtual=2 stages per rank, not 3"),
    (("1f1b", 4, 1, 3), "3 micro-batches for 4 stages"),
    (("dualpipev", 2, 2, 3), "3 micro-batches for 4 stages"),
    (("interleaved-zb", 4, 2, 9), "9 micro-batches are not a multiple of 2 rounds"),
    (("1f1b", 2, 1, 0), "0 micro-batches"),
    (("pipedream", 2, 1, 4), "unknown pipeline schedule 'pipedream'"),
])
def test_schedule_rules(args, message):
    with pytest.raises(SpecError, match=message):
        pp.check_schedule(*args)


def test_schedule_rules_accept():
    pp.check_schedule("interleaved-1f1b", 4, 2, 8)
    pp.check_schedule("interleaved-1f1b", 4, 2, 3)  # fewer than a round: one round
    pp.check_schedule("zbv", 4, 2, 2)
    pp.check_schedule("gpipe", 4, 1, 1)


# ---- stage modules on the meta device ----

def test_stage_modules_own_their_share_under_global_names():
    full = _meta_model()
    names = {n: p.numel() for n, p in full.named_parameters()}
    block = sum(p.numel() for p in full.layers["0"].parameters())
    owned: dict[str, int] = {}
    for rank in range(2):
        for i, module in pp.stage_modules(full, "interleaved-1f1b", rank, 2, virtual=2).items():
            params = dict(module.named_parameters())
            assert all(p.is_meta for p in params.values())
            assert set(params) <= set(names) and not set(params) & set(owned)
            owned.update({n: p.numel() for n, p in params.items()})
            extra = ((CFG["vocab_size"] * CFG["hidden_size"] if i == 0 else 0)
                     + (CFG["hidden_size"] * (CFG["vocab_size"] + 1) if i == 3 else 0))
            assert sum(p.numel() for p in params.values()) == block + extra
            assert list(module.layers.keys()) == [str(i)]
    assert owned == names  # the stages together hold the model, each parameter once


def test_stage_chain_equals_the_model():
    """Stages run one after the other compute the model's hidden states and loss."""
    full = LlamaModel(ModelConfig(**CFG))
    full.init_weights(SEED)
    chain = [pp.stage_modules(_meta_model(), "1f1b", r, 3, layers_per_stage=[1, 2, 1])[r]
             for r in range(3)]
    for module in chain:
        module.to_empty(device="cpu")
        module.init_weights(SEED)
    ids, targets, mask = _batch(0)
    h = ids
    for module in chain:
        h = module(h)
    assert torch.allclose(h, full.forward_hidden(ids), atol=1e-6)
    labels = targets.masked_fill(~mask, pp.IGNORE)
    loss = pp.fused_loss_fn(chain[-1])(h, labels, scale=0.5)
    assert torch.allclose(loss, 0.5 * full(ids, targets=targets, loss_mask=mask), atol=1e-5)


def test_tied_embeddings_refused_with_stages():
    with pytest.raises(SpecError, match="tie_word_embeddings is not supported with 2 pipeline"):
        pp.stage_modules(_meta_model(tie_word_embeddings=True), "1f1b", 0, 2)
    assert list(pp.stage_modules(_meta_model(tie_word_embeddings=True), "1f1b", 0, 1)) == [0]


# ---- training over 2 processes equals one process ----

# (schedule, virtual stages per rank, layers per stage, micro-batches)
RUNS = [
    ("gpipe", 1, None, 2),
    ("1f1b", 1, [3, 1], 4),  # uneven
    ("interleaved-1f1b", 2, None, 4),
    ("interleaved-zb", 2, None, 4),
    ("zbv", 2, None, 4),
    ("dualpipev", 2, None, 4),
]


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ + 1), generator=g)
    mask = torch.rand(BATCH, SEQ, generator=g) > 0.2
    return tokens[:, :-1], tokens[:, 1:], mask


def _reference() -> tuple[list[float], list[float], dict[str, np.ndarray]]:
    """One process: the loop's loss scaling (sum of token losses / loss tokens), torch's clip."""
    model = LlamaModel(ModelConfig(**CFG))
    model.init_weights(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses, norms = [], []
    for step in range(STEPS):
        ids, targets, mask = _batch(step)
        loss_sum = model(ids, targets=targets, loss_mask=mask)
        (loss_sum / mask.sum()).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        losses.append(float(loss_sum.detach() / mask.sum()))
    return losses, norms, {n: p.detach().numpy() for n, p in model.named_parameters()}


def _train_pipelined(schedule, virtual, layers, n_micro, mesh):
    rank, size = mesh.get_local_rank(), mesh.size()
    modules = pp.stage_modules(_meta_model(), schedule, rank, size, virtual, layers)
    for module in modules.values():
        module.to_empty(device="cpu")
        module.init_weights(SEED)
    num_stages = size * virtual
    stages = pp.pipeline_stages(modules, num_stages, mesh, torch.device("cpu"))
    is_first, is_last = 0 in modules, num_stages - 1 in modules
    loss_fn = pp.fused_loss_fn(modules[num_stages - 1]) if is_last else None
    sched = pp.build_schedule(schedule, stages, n_micro, loss_fn)
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
    losses, norms = [], []
    for step in range(STEPS):
        ids, targets, mask = _batch(step)
        loss_sum = pp.pipeline_step(sched, ids, targets, mask, is_first, is_last,
                                    scale=1.0 / mask.sum())
        norms.append(float(clip_grad_norm_(params, CLIP, mesh.get_group())))
        opt.step()
        opt.zero_grad()
        if is_last:
            losses.append(float(loss_sum / mask.sum()))
    weights = {n: p.detach().numpy() for m in modules.values() for n, p in m.named_parameters()}
    return losses, norms, weights


def _rank(rank: int, port: int, out) -> None:
    try:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE="2")
        dist.init_process_group("gloo", rank=rank, world_size=2)
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
        results = [_train_pipelined(*run, mesh=mesh) for run in RUNS]
        dist.destroy_process_group()
        out.put((rank, results))
    except BaseException:
        out.put((rank, traceback.format_exc()))


def test_pipeline_schedules_train_as_one_process():
    """Each schedule over 2 ranks (interleaved ones 2 × 2 virtual stages), one split uneven:
    10 AdamW steps with global-norm clipping give one process's losses, norms and weights."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, result in results.items():
        assert not isinstance(result, str), f"rank {rank} failed:\n{result}"
    ref_losses, ref_norms, ref_weights = _reference()
    assert ref_norms[0] > CLIP, "clipping must be active for the global norm to matter"
    for i, run in enumerate(RUNS):
        (l0, n0, w0), (l1, n1, w1) = results[0][i], results[1][i]
        losses = l0 or l1  # on the rank of the last stage
        assert np.allclose(losses, ref_losses, rtol=0, atol=1e-5), (run, losses, ref_losses)
        # gradients summed over micro-batches in another order: norms ~1 agree to ~1.5e-5
        assert np.allclose(n0, ref_norms, rtol=3e-5, atol=0) and n0 == n1, run
        weights = {**w0, **w1}
        assert set(weights) == set(ref_weights) and not set(w0) & set(w1), run
        for name, ref in ref_weights.items():
            assert np.allclose(weights[name], ref, rtol=0, atol=1e-5), (run, name)
