"""The planner's data-parallel communication (engine/plan/timing.py) against the engine's: the
bytes a rank sends in a step, predicted, equal to what the collectives of real training steps
hand to gloo (tests/comm_bytes.py) under DDP in each precision and under FSDP, with one and two
micro-batches a step; and the rule for what of it the backward hides."""

from __future__ import annotations

import pytest
import yaml

from conftest import module_ranks
from engine.model.config import ModelConfig
from engine.plan.estimate import estimate
from engine.plan.timing import gpus
from engine.train.spec import PretrainSpec
from test_parallel import MODEL, _spec

RANKS = 2
# what a rank sends of the whole tensor, in the planner's ring convention: an all-reduce is a
# reduce-scatter and an all-gather, each (n − 1)/n of the tensor
RING = {"allreduce_": 2 * (RANKS - 1) / RANKS, "_allgather_base_": (RANKS - 1) / RANKS,
        "_reduce_scatter_base_": (RANKS - 1) / RANKS}
# DDP's second step first broadcasts rank 0's bucket indices (a few dozen bytes): no gradients
CONTROL_BYTES = 256


@pytest.mark.parametrize("data_parallel, precision, micro", [  # fp32 and fp16: bf16's path
    ("ddp", "bf16", 2), ("ddp", "bf16-master", 1), ("ddp", "bf16-master", 2),
    ("fsdp", "bf16", 1), ("fsdp", "bf16", 2)])
def test_predicted_bytes_are_what_the_collectives_send(data_parallel, precision, micro,
                                                       tiny_dataset, tmp_path):
    """Two steps on 2 gloo ranks; every step's gradient reductions (and FSDP's gathers) equal
    the prediction to the byte: DDP sends fp32 gradients in every precision, FSDP gathers the
    bf16 weights for each micro-batch's forward and backward and reduce-scatters the fp32
    gradients once a step."""
    spec = {**_spec(tiny_dataset, tmp_path / "run"), "iters": 2, "micro_batch_size": 1,
            "global_batch_size": RANKS * micro, "precision": precision,
            "data_parallel": data_parallel, "eval": {"interval": None}}
    config = tmp_path / "spec.yaml"
    config.write_text(yaml.safe_dump(spec))
    predicted = estimate(ModelConfig.model_validate(MODEL), PretrainSpec.model_validate(spec),
                         RANKS, gpus()["H100"], RANKS).timing.comm_bytes
    for steps in module_ranks("tests.comm_bytes", [str(config)], RANKS):
        assert len(steps) == 2
        for calls in steps:
            assert sum(size for name, size in calls if name not in RING) < CONTROL_BYTES, calls
            sent = sum(RING[name] * size for name, size in calls if name in RING)
            assert sent == predicted, (calls, predicted)


TINYLLAMA = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                        num_layers=22, num_heads=32, num_kv_heads=4,
                        max_position_embeddings=4096)


def _timing(gpus_per_node: int, precision: str = "bf16", micro: int = 1, **fields):
    """The 1.1B shape under DDP on 8 H100s, a node of `gpus_per_node` (1: the all-reduce
    crosses the network and takes longer than the backward; 8: it fits in it)."""
    spec = {"model": TINYLLAMA.model_dump(), "data": {"blend": ["d"], "seq_length": 2048},
            "checkpoint": {"save": "s"}, "iters": 1, "micro_batch_size": 2,
            "global_batch_size": 16 * micro, "precision": precision, "compile": True, **fields}
    return estimate(TINYLLAMA, PretrainSpec.model_validate(spec), 8, gpus()["H100"],
                    gpus_per_node).timing


def test_what_the_backward_hides_of_the_gradient_reduction():
    """One micro-batch: its backward (2/3 of the compute) hides the all-reduce, up to its own
    length. Two: only the last one's backward reduces. bf16-master's fp32 sums of several
    micro-batches are reduced after the backwards, and so is everything with
    overlap_grad_reduce off: nothing hidden."""
    slow, fast = _timing(1), _timing(8)
    assert 0 < slow.exposed_dp_s == pytest.approx(slow.dp_comm_s - slow.compute_s * 2 / 3)
    assert fast.dp_comm_s > 0 and fast.exposed_dp_s == 0
    two = _timing(1, micro=2)
    assert two.exposed_dp_s == pytest.approx(two.dp_comm_s - two.compute_s * 2 / 3 / 2)
    for timing in (_timing(8, "bf16-master", micro=2), _timing(8, overlap_grad_reduce=False)):
        assert timing.exposed_dp_s == timing.dp_comm_s > 0
        assert timing.step_s == pytest.approx(fast.step_s - fast.compute_s + timing.compute_s
                                              + timing.dp_comm_s)
