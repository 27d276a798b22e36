"""The planner's spec: torch-free, as the whole planner is."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.model.config import ModelConfig
from engine.parallel.layout import DataParallel, Recompute
from engine.spec import StageSpec


class Spec(StageSpec):
    """Plan a training run before a GPU is queued: for each layout (TP, PP, CP, DDP/FSDP, CPU
    offload, micro-batch, recompute) the memory of its most loaded GPU by category, the step time, MFU
    and days for a token budget; the layouts that fit, fastest first, and the recommended one
    (docs/planner.md)."""

    model: ModelConfig | None = Field(None, description="the architecture; or load")
    load: str | None = Field(None, description="an HF folder or native checkpoint whose "
                             "architecture to plan for")
    seq_length: int = Field(2048, gt=0)
    global_batch_size: int = Field(512, gt=0, description="sequences per optimizer step")
    precision: Literal["bf16", "bf16-master", "fp16", "fp32"] | None = Field(
        None, description="None: the engine's default for each layout (bf16-master under "
        "DDP with a whole model per GPU, bf16 otherwise)")
    compile: bool = Field(False, description="the training compiles its blocks (fused "
                          "elementwise kernels: less memory traffic; activations are predicted "
                          "as eager's)")
    float8: bool = Field(False, description="the blocks' matmuls in float8 (the training "
                         "spec's float8 section, first and last block in bf16; no TP)")
    gpu: str = Field("H100", description="a row of engine/plan/gpus.json (memory and rates)")
    gpus_per_node: int = Field(8, ge=1)
    nodes: int = Field(1, ge=1)
    tokens: float | None = Field(None, gt=0, description="token budget: days to train it")
    tensor_parallel: int | None = Field(None, ge=1, description="None: searched")
    pipeline_parallel: int | None = Field(None, ge=1, description="None: searched")
    context_parallel: int | None = Field(None, ge=1, description="None: searched")
    data_parallel: DataParallel | None = Field(None, description="None: searched")
    cpu_offload: bool | None = Field(None, description="FSDP's shards and the optimizer in "
                                     "host memory; None: searched")
    micro_batch_size: int | None = Field(None, ge=1, description="None: searched")
    recompute: Recompute | None = Field(None, description="None: searched")
    rows: int = Field(12, ge=1, description="layouts in the report")
    output: str | None = Field(None, description="also write the ranked layouts as JSON here")

    @model_validator(mode="after")
    def _one_model(self) -> "Spec":
        if (self.model is None) == (self.load is None):
            raise ValueError("give the architecture (model) or a model folder (load), not both")
        return self

    def fixed(self) -> dict:
        """The layout fields given (the others are searched)."""
        names = ("tensor_parallel", "pipeline_parallel", "context_parallel", "data_parallel",
                 "cpu_offload", "micro_batch_size", "recompute", "precision")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def training(self, model: ModelConfig) -> dict:
        """A pretrain spec of this shape (its layout fields are the search's)."""
        return {"model": model.model_dump(mode="json"),
                "data": {"blend": ["planned"], "seq_length": self.seq_length},
                "checkpoint": {"save": "planned"}, "iters": 1,
                "global_batch_size": self.global_batch_size, "compile": self.compile,
                "float8": {} if self.float8 else None}
