"""How a job's ranks divide into the parallel dimensions, and whether a model divides over them.
Torch-free: the training spec and cluster/ check layouts before any job is queued.

Ranks are laid out as a grid (pp, dp_replicate, dp_shard, cp, tp), tp fastest: the ranks of
one tensor-parallel group are neighbours, so on a node of 8 GPUs TP 8 stays on NVLink, context
parallel (a collective per layer) next, and pipeline stages are furthest apart (their traffic
is the smallest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from engine.errors import SpecError

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
DataParallel = Literal["ddp", "fsdp"]
Recompute = Literal["none", "selective", "full"]  # see engine/parallel/recompute.py
PipelineSchedule = Literal["gpipe", "1f1b", "interleaved-1f1b", "interleaved-zb", "zbv",
                           "dualpipev"]
"""torch's schedules (engine/parallel/pipeline.py): GPipe (all forwards, then all backwards),
1F1B (one stage per rank), interleaved 1F1B and interleaved zero-bubble (ZB1P) over `virtual`
looped stages per rank, ZB-V and DualPipeV over two stages per rank placed in a V."""
SINGLE_STAGE = ("gpipe", "1f1b")  # torch's PipelineScheduleSingle: one stage per rank
V_SHAPED = ("zbv", "dualpipev")  # exactly two stages per rank: (r, 2·pp − 1 − r)


@dataclass(frozen=True)
class Layout:
    """Sizes of the five mesh dimensions; their product is the world size."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: the number of different micro-batches a step sees at once."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp(self) -> int:
        """Ranks that hold the same part of the model and average its gradients: data parallel
        and context parallel (different tokens of the same micro-batches)."""
        return self.dp * self.cp

    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in DIMS)

    def describe(self) -> str:
        return " × ".join(f"{d} {getattr(self, d)}" for d in DIMS)


def layout_for(world_size: int, tensor_parallel: int = 1, pipeline_parallel: int = 1,
               data_parallel: DataParallel = "ddp", data_parallel_replicate: int = 1,
               context_parallel: int = 1) -> Layout:
    """The layout of `world_size` ranks: TP × PP × CP as given, the rest data parallel —
    replicated under ddp; under fsdp sharded, in `data_parallel_replicate` replicas (HSDP) if
    > 1."""
    model_ranks = tensor_parallel * pipeline_parallel * context_parallel
    if world_size % model_ranks:
        raise ValueError(f"world size {world_size} is not a multiple of tensor_parallel "
                         f"{tensor_parallel} × pipeline_parallel {pipeline_parallel} × "
                         f"context_parallel {context_parallel} = {model_ranks}")
    dp = world_size // model_ranks
    given = dict(pp=pipeline_parallel, cp=context_parallel, tp=tensor_parallel)
    if data_parallel == "ddp":
        if data_parallel_replicate not in (1, dp):
            raise ValueError("data_parallel_replicate applies to fsdp (HSDP); ddp replicates "
                             "over every data-parallel rank")
        return Layout(dp_replicate=dp, **given)
    if dp % data_parallel_replicate:
        raise ValueError(f"{dp} data-parallel ranks (world size {world_size} / {model_ranks} "
                         f"model-parallel ranks) are not a multiple of data_parallel_replicate "
                         f"{data_parallel_replicate}")
    return Layout(dp_replicate=data_parallel_replicate, dp_shard=dp // data_parallel_replicate,
                  **given)


def model_errors(layout: Layout, num_heads: int, num_kv_heads: int, intermediate_size: int,
                 vocab_size: int, num_layers: int, stages: int,
                 layers_per_stage: list[int] | None = None,
                 tied_embeddings: bool = False) -> list[str]:
    """What does not divide: TP shards heads, KV heads, the FFN width and the vocabulary; the
    pipeline needs a layer per stage (`stages` = pp × virtual stages), `layers_per_stage` (if
    given) one count per stage summing to the layers, and an untied head."""
    tp, errors = layout.tp, []
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("intermediate_size", intermediate_size), ("vocab_size", vocab_size)):
        if value % tp:
            errors.append(f"model {name} {value} is not divisible by tensor_parallel {tp}")
    if layers_per_stage is None and num_layers < stages:
        errors.append(f"model num_layers {num_layers} is fewer than the {stages} pipeline "
                      f"stages (pipeline_parallel × virtual stages)")
    elif layers_per_stage is not None:
        try:
            split_layers(num_layers, stages, layers_per_stage)
        except SpecError as exc:
            errors.append(str(exc))
    if tied_embeddings and stages > 1:
        errors.append(f"tie_word_embeddings is not supported with {stages} pipeline stages: the "
                      "embedding (first stage) and the head (last stage) would be one weight on "
                      "two ranks; train with an untied head or without pipeline parallelism")
    return errors


def context_parallel_errors(model) -> list[str]:
    """What in a model (a ModelConfig) context parallelism cannot split: dynamic NTK's
    frequencies follow the whole sequence's length, which no rank sees; flash_attn_4's causal
    alignment for fewer queries than keys is unchecked."""
    errors = []
    if model.rope_scaling.type == "dynamic":
        errors.append("rope_scaling dynamic cannot be trained with context_parallel")
    if model.attention_backend == "flash_attn_4":
        errors.append("attention_backend flash_attn_4 is not supported with context_parallel: "
                      "use sdpa or flash_attn")
    return errors


def split_layers(num_layers: int, num_stages: int,
                 layers_per_stage: list[int] | None = None) -> list[range]:
    """The global layer indices of each stage: `layers_per_stage` when given, else as even as
    possible. A remainder goes to the middle stages, then to the first, never to the last: the
    last stage also runs the head and the loss (2·vocab·hidden FLOPs a token, more than a block
    for large vocabularies), the first only an embedding lookup; the middle ones run blocks alone.
    """
    if layers_per_stage is None:
        if not 1 <= num_stages <= num_layers:
            raise SpecError(f"{num_layers} layers cannot make {num_stages} pipeline stages of "
                            "at least one layer each")
        base, extra = divmod(num_layers, num_stages)
        takers = list(range(1, num_stages - 1)) + [0]
        counts = [base + (stage in takers[:extra]) for stage in range(num_stages)]
    else:
        counts = list(layers_per_stage)
        if len(counts) != num_stages:
            raise SpecError(f"layers_per_stage {counts} names {len(counts)} stages; the pipeline "
                            f"has {num_stages}")
        if sum(counts) != num_layers or min(counts) < 1:
            raise SpecError(f"layers_per_stage {counts} must be at least 1 each and sum to the "
                            f"model's {num_layers} layers (they sum to {sum(counts)})")
    starts = [sum(counts[:i]) for i in range(num_stages)]
    return [range(start, start + n) for start, n in zip(starts, counts)]


def float8_blocks(num_layers: int, bf16_blocks: int) -> range:
    """The blocks whose matmuls run in float8: all but the first and the last `bf16_blocks`
    (engine/parallel/float8.py converts them; the planner counts them)."""
    return range(bf16_blocks, num_layers - bf16_blocks)


def stage_ids(schedule: PipelineSchedule, pp_rank: int, pp_size: int,
              virtual: int = 1) -> list[int]:
    """The stages this rank runs, in pipeline order: looped (`rank + k·pp_size`, as torch's
    interleaved schedules place them) or, for the V schedules, rank r holds r and 2·pp − 1 − r,
    so the first and last stage share rank 0 and the turn of the V needs no transfer."""
    if schedule in V_SHAPED:  # virtual is 2 (check_layout)
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + k * pp_size for k in range(virtual)]


def check_layout(schedule: str, pp_size: int, virtual: int) -> None:
    """The stages per rank (`virtual`) that `schedule` runs; the errors name the numbers."""
    if schedule not in get_args(PipelineSchedule):
        raise SpecError(f"unknown pipeline schedule {schedule!r}; one of "
                        f"{get_args(PipelineSchedule)}")
    if pp_size < 1:
        raise SpecError(f"pipeline size {pp_size} must be ≥ 1")
    if schedule in SINGLE_STAGE and virtual != 1:
        raise SpecError(f"schedule {schedule!r} runs one stage per rank, not virtual={virtual}: "
                        "use interleaved-1f1b or interleaved-zb for virtual stages")
    if schedule in ("interleaved-1f1b", "interleaved-zb") and virtual < 2:
        raise SpecError(f"schedule {schedule!r} needs virtual ≥ 2 stages per rank, not "
                        f"{virtual}: use 1f1b for one")
    if schedule in V_SHAPED and virtual != 2:
        raise SpecError(f"schedule {schedule!r} needs exactly virtual=2 stages per rank, not "
                        f"{virtual}")


def check_schedule(schedule: str, pp_size: int, virtual: int, n_microbatches: int) -> None:
    """check_layout, and the micro-batch counts `schedule` can run."""
    check_layout(schedule, pp_size, virtual)
    num_stages = pp_size * virtual
    if n_microbatches < 1:
        raise SpecError(f"{n_microbatches} micro-batches: the pipeline needs at least 1")
    if schedule in ("1f1b", "dualpipev") and n_microbatches < num_stages:
        raise SpecError(f"schedule {schedule!r} needs at least as many micro-batches as stages: "
                        f"{n_microbatches} micro-batches for {num_stages} stages")
    rounds = max(1, n_microbatches // pp_size)
    if schedule in ("interleaved-1f1b", "interleaved-zb") and n_microbatches % rounds:
        raise SpecError(f"schedule {schedule!r} runs micro-batches in rounds of pipeline size "
                        f"{pp_size}: {n_microbatches} micro-batches are not a multiple of "
                        f"{rounds} rounds (use a multiple of {pp_size}, or fewer than it)")
