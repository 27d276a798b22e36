"""What one job asks for: nodes, GPUs, CPUs, memory, time. A profile gives defaults; a
submission overrides the fields it names."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: int | None = Field(
        None, ge=1, description="ranks per node; default: one per GPU, or 1 without GPUs. "
        "On CPU, more than one runs several ranks per node (gloo)")
    cpus_per_task: int = Field(1, ge=1, description="also the default OMP_NUM_THREADS of each rank")
    mem_gb: float | None = Field(None, gt=0,
                                 description="memory per node; None: the partition's default")
    gpu: str | None = Field(None, description="the GPU model, a row of engine/plan/gpus.json "
                            "(H100, H200, A100): a training layout predicted not to fit its "
                            "memory is refused before it is queued")
    time_min: int = Field(60, ge=1,
                          description="time limit of one attempt (a requeue starts a new one)")

    @model_validator(mode="after")
    def _one_rank_per_gpu(self) -> "Resources":
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise ValueError(f"one rank per GPU: tasks_per_node ({self.tasks_per_node}) must equal "
                             f"gpus_per_node ({self.gpus_per_node}) or be left out")
        return self

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def override(self, given: "Resources | dict | None") -> "Resources":
        """These resources with the fields that `given` sets explicitly replaced."""
        if given is None:
            return self
        if isinstance(given, dict):
            given = Resources.model_validate(given)
        return Resources.model_validate({**self.model_dump(),
                                         **given.model_dump(exclude_unset=True)})
