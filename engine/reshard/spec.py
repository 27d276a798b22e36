"""The reshard stage's spec: torch-free, so that listing stages, the CLI's help and the flows'
checks never import torch. The target layout is given as training gives it (tensor_parallel,
pipeline_parallel, data_parallel, data_parallel_replicate; the rest of the job's ranks data
parallel) and checked against the source's model where the source is visible, and against the
job's world size at submission, before any job is queued."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from engine.checkpoint.latest import latest_iteration
from engine.errors import InputError
from engine.formats import CONFIG
from engine.model.config import ModelConfig
from engine.parallel.layout import DataParallel, Layout, layout_for, model_errors
from engine.spec import StageSpec

CONSOLIDATED = "model.safetensors"  # the one file of a consolidated output


class Spec(StageSpec):
    """Rewrite a native checkpoint for another layout (tensor, pipeline and data parallel over the
    job's ranks), with or without its optimizer state, or as one consolidated safetensors file.
    The output is read back and compared with what was loaded, tensor by tensor, before it is
    renamed into place; a training run resumes from it (`load`) in the new layout."""

    input: str = Field(description="native checkpoint folder (its latest complete iteration) or "
                                   "one iter_* folder", json_schema_extra={"input": True})
    output: str = Field(description="output folder (must not exist or be empty)",
                        json_schema_extra={"affects_output": False})
    tensor_parallel: int = Field(1, ge=1, description="ranks each layer's matrices are split "
                                 "over (must divide heads, KV heads, FFN width, vocabulary)")
    pipeline_parallel: int = Field(1, ge=1, description="pipeline stages (at most one per layer)")
    data_parallel: DataParallel = Field("ddp", description="ddp (replicated), or fsdp (sharded "
                                        "over the data-parallel ranks)")
    data_parallel_replicate: int = Field(1, ge=1, description="fsdp: replicas of the sharded "
                                         "model (HSDP)")
    optimizer: bool = Field(True, description="keep the optimizer state; --no-optimizer: weights "
                            "only (training starts from them, finetune-style, but cannot resume)")
    consolidate: bool = Field(False, description=f"write one file, {CONSOLIDATED} (global "
                              "names, fp32; optimizer state too unless --no-optimizer), instead "
                              "of a sharded checkpoint; the layout is then how the job's ranks "
                              "hold the model while rank 0 gathers it")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the ranks hold the model: auto (a GPU each when there are "
        "GPUs), cpu or cuda", json_schema_extra={"affects_output": False})

    def layout(self, world_size: int) -> Layout:
        """The target layout of `world_size` ranks (ValueError naming the numbers if they do
        not divide)."""
        return layout_for(world_size, self.tensor_parallel, self.pipeline_parallel,
                          self.data_parallel, self.data_parallel_replicate)

    def check_world(self, world_size: int) -> None:
        self.layout(world_size)

    @model_validator(mode="after")
    def _fits_source(self) -> Spec:
        """Checked where the source is visible, so that a layout that cannot hold its model, or
        optimizer state it does not have, is refused before a job is queued."""
        found = source_files(self.input)
        if found is None:
            return self
        meta, model = found
        layout = Layout(pp=self.pipeline_parallel, tp=self.tensor_parallel)
        problems = model_errors(layout, model.num_heads, model.num_kv_heads,
                                model.intermediate_size, model.vocab_size, model.num_layers,
                                self.pipeline_parallel)
        if self.optimizer and not meta.get("has_optimizer"):
            problems.append("it holds no optimizer state (weights only): pass --no-optimizer "
                            "(optimizer: false)")
        if problems:
            raise ValueError(f"{self.input}: {'; '.join(problems)}")
        return self


def source_dir(path: str | Path) -> Path | None:
    """The iteration folder a checkpoint path names (itself, or the one its latest-iteration
    file names), or None when it names none."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    try:
        iteration = latest_iteration(path)
    except InputError:
        return None
    return None if iteration is None else path / f"iter_{iteration:07d}"


def source_files(path: str | Path) -> tuple[dict[str, Any], ModelConfig] | None:
    """(meta.json, model config) of the checkpoint `path` names, when both are readable; None
    otherwise (the stage then says what is wrong, with the checks of engine.checkpoint)."""
    folder = source_dir(path)
    if folder is None:
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        return meta, ModelConfig.model_validate_json((folder / "model_config.json").read_text())
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


def model_config_of(path: str | Path) -> ModelConfig | None:
    """The model config of a native checkpoint or an HF folder where it is readable (else the
    stage that reads the model says what is wrong)."""
    found = source_files(path)
    if found is not None:
        return found[1]
    try:
        return ModelConfig.from_hf(json.loads((Path(path) / CONFIG).read_text()))
    except (OSError, ValueError):
        return None


def input_paths(spec: Spec) -> dict[str, str]:
    """The source checkpoint (engine.lineage)."""
    return {"source": spec.input}
