"""How a job's ranks divide into the parallel dimensions, and whether a model divides over them.
Torch-free: the training spec and cluster/ check layouts before any job is queued.

Ranks are laid out as a grid (pp, dp_replicate, dp_shard, tp), tp fastest: the ranks of one
tensor-parallel group are neighbours, so on a node of 8 GPUs TP 8 stays on NVLink, and pipeline
stages are furthest apart (their traffic is the smallest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
DataParallel = Literal["ddp", "fsdp"]
Recompute = Literal["none", "selective", "full"]  # see engine/parallel/recompute.py


@dataclass(frozen=True)
class Layout:
    """Sizes of the four mesh dimensions; their product is the world size."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: the number of different micro-batches a step sees at once."""
        return self.dp_replicate * self.dp_shard

    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in DIMS)

    def describe(self) -> str:
        return " × ".join(f"{d} {getattr(self, d)}" for d in DIMS)


def layout_for(world_size: int, tensor_parallel: int = 1, pipeline_parallel: int = 1,
               data_parallel: DataParallel = "ddp", data_parallel_replicate: int = 1) -> Layout:
    """The layout of `world_size` ranks: TP × PP as given, the rest data parallel — replicated
    under ddp; under fsdp sharded, in `data_parallel_replicate` replicas (HSDP) if > 1."""
    model_ranks = tensor_parallel * pipeline_parallel
    if world_size % model_ranks:
        raise ValueError(f"world size {world_size} is not a multiple of tensor_parallel "
                         f"{tensor_parallel} × pipeline_parallel {pipeline_parallel} = "
                         f"{model_ranks}")
    dp = world_size // model_ranks
    if data_parallel == "ddp":
        if data_parallel_replicate not in (1, dp):
            raise ValueError("data_parallel_replicate applies to fsdp (HSDP); ddp replicates "
                             "over every data-parallel rank")
        return Layout(pipeline_parallel, dp, 1, tensor_parallel)
    if dp % data_parallel_replicate:
        raise ValueError(f"{dp} data-parallel ranks (world size {world_size} / tensor_parallel "
                         f"× pipeline_parallel {model_ranks}) are not a multiple of "
                         f"data_parallel_replicate {data_parallel_replicate}")
    return Layout(pipeline_parallel, data_parallel_replicate, dp // data_parallel_replicate,
                  tensor_parallel)


def model_errors(layout: Layout, num_heads: int, num_kv_heads: int, intermediate_size: int,
                 vocab_size: int, num_layers: int, stages: int) -> list[str]:
    """What does not divide: TP shards heads, KV heads, the FFN width and the vocabulary; the
    pipeline needs a layer per stage (`stages` = pp × virtual stages)."""
    tp, errors = layout.tp, []
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("intermediate_size", intermediate_size), ("vocab_size", vocab_size)):
        if value % tp:
            errors.append(f"model {name} {value} is not divisible by tensor_parallel {tp}")
    if num_layers < stages:
        errors.append(f"model num_layers {num_layers} is fewer than the {stages} pipeline "
                      f"stages (pipeline_parallel × virtual stages)")
    return errors
