"""The layouts a training spec could run in on a number of GPUs, each estimated, ranked:
those that fit first, fastest first. Torch-free."""

from __future__ import annotations

import itertools

from pydantic import ValidationError

from engine.errors import SpecError
from engine.model.config import ModelConfig
from engine.plan.estimate import LAYOUT_FIELDS, Estimate, estimate
from engine.plan.timing import Gpu
from engine.spec import format_validation_error

POWERS = (1, 2, 4, 8, 16, 32, 64)


def candidates(base: dict, cfg: ModelConfig, world_size: int, gpus_per_node: int,
               spec_type: type, fixed: dict) -> list:
    """Training specs that differ from `base` (a TrainSpec's fields) in their layout fields:
    TP within a node, PP (1F1B, and interleaved over 2 stages a rank), context parallel for
    long sequences, DDP, FSDP or (over several nodes) HSDP with a replica a node, FSDP with
    CPU offload (without TP or PP; on one GPU too), micro-batches and recompute; DDP also in
    bf16 over fp32 weights, besides its default bf16-master (fp32 gradients exist only in the
    backward: the biggest model a GPU trains whole); `fixed` fields stay as given.
    Specs the engine would refuse (a model that does not divide, a batch that does not split)
    are left out; SpecError with the first one's reason when none is left."""
    seq, batch = base["data"]["seq_length"], base["global_batch_size"]
    tps = [t for t in POWERS if t <= gpus_per_node and world_size % t == 0]
    pps = [p for p in POWERS if p <= cfg.num_layers]
    cps = [c for c in POWERS if c == 1 or seq // c >= 4096]
    nodes = max(1, world_size // gpus_per_node)
    data_parallel = [("ddp", 1, False), ("fsdp", 1, False), ("fsdp", 1, True)] + (
        [("fsdp", nodes, False)] if nodes > 1 else [])
    precisions = [None] + (["bf16"] if "precision" not in fixed else [])  # None: the default
    grid = itertools.product(tps, pps, ("1f1b", "interleaved-1f1b"), cps, data_parallel,
                             POWERS[:5], ("none", "selective", "full"), precisions)
    specs, refused = [], None
    for tp, pp, schedule, cp, (dp, replicate, offload), mb, recompute, precision in grid:
        if (pp == 1 and schedule != "1f1b") or world_size % (tp * pp * cp) or (cp > 1 and pp > 1):
            continue
        if batch % (mb * world_size // (tp * pp * cp)):
            continue
        if dp == "fsdp" and world_size == tp * pp and not offload:  # nothing to shard
            continue
        if (offload and tp * pp > 1) or (precision and dp != "ddp"):
            continue
        fields = {"tensor_parallel": tp, "pipeline_parallel": pp, "pipeline_schedule": schedule,
                  "virtual_stages": 2 if schedule.startswith("interleaved") else 1,
                  "context_parallel": cp, "data_parallel": dp,
                  "data_parallel_replicate": replicate, "cpu_offload": offload,
                  "micro_batch_size": mb, "recompute": recompute, "pipeline_layers": None,
                  **({"precision": precision} if precision else {})}
        fields.update(fixed)
        try:
            specs.append(spec_type.model_validate({**base, **fields}))
        except (ValidationError, ValueError) as exc:
            refused = refused or exc
    if not specs:
        reason = format_validation_error(refused, "<training spec>") \
            if isinstance(refused, ValidationError) else str(refused)
        raise SpecError(f"no layout of this training on {world_size} GPUs is valid: {reason}")
    return specs


def ranked(cfg: ModelConfig, specs: list, world_size: int, gpu: Gpu,
           gpus_per_node: int) -> list[Estimate]:
    seen, out = set(), []
    for spec in specs:
        key = tuple(getattr(spec, k) for k in LAYOUT_FIELDS)
        if key in seen:
            continue
        seen.add(key)
        try:
            out.append(estimate(cfg, spec, world_size, gpu, gpus_per_node))
        except ValueError:  # a layout the world size does not divide into
            continue
    return sorted(out, key=lambda e: (not e.fits, -round(e.tokens_per_s), e.memory.total))


def alternatives(spec, cfg: ModelConfig, world_size: int, gpu: Gpu, gpus_per_node: int,
                 fixed: dict) -> list[Estimate]:
    """The training of `spec` (a TrainSpec) in each candidate layout on these GPUs, ranked;
    `fixed`: fields held (the precision, when it was chosen rather than defaulted)."""
    base = {k: v for k, v in spec.model_dump(mode="json").items() if k != "precision"}
    base["model"] = cfg.model_dump(mode="json")
    return ranked(cfg, candidates(base, cfg, world_size, gpus_per_node, type(spec), fixed),
                  world_size, gpu, gpus_per_node)
