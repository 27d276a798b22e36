"""Cluster profiles: where and how stages run, as data (YAML) rather than code.

A profile names the executor (`slurm`, `local`, `inline`) and everything site-specific: partition,
account, qos, constraint, setup lines, container, environment, default resources, the default
parallel layout of training stages, requeue policy.
Shipped profiles live in cluster/profiles/*.yaml and are loaded by name; any other YAML file by
path. Unknown fields are errors that name the file, line and field, like stage specs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from cluster.container import Container
from cluster.resources import Resources
from engine.errors import LmforgeError, SpecError
from engine.parallel.layout import DataParallel, Recompute
from engine.spec import StageSpec, format_validation_error, read_config
from engine.train.spec import TrainSpec

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "local"
PROFILE_ENV = "LMFORGE_CLUSTER_PROFILE"  # the profile used when none is named


class ProfileError(LmforgeError, ValueError):
    """A profile that cannot be used: bad YAML, an unknown field, or a value the cluster rejects."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SlurmSettings(_Section):
    partition: str | None = Field(None, description="None: the cluster's default partition")
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    sbatch: dict[str, str | int | bool] = Field(
        default_factory=dict, description="extra #SBATCH options, e.g. {reservation: r1}")
    srun_args: list[str] = Field(default_factory=list)


class Requeue(_Section):
    signal_delay_s: int = Field(120, ge=15, description="USR2 this long before the time limit: "
                                "the engine saves a checkpoint and the job is requeued")
    max_num_timeout: int = Field(3, ge=0, description="requeues after time limits; preemptions "
                                 "are not counted")


class LayoutDefaults(_Section):
    """The parallel layout training stages (pretrain, finetune) get on this cluster where their
    spec names none, e.g. TP over the GPUs of a node. Merged into the spec's data before it is
    validated (so `data_parallel: fsdp` brings its default precision, bf16) and fingerprinted."""
    tensor_parallel: int | None = Field(None, ge=1)
    sequence_parallel: bool | None = None
    pipeline_parallel: int | None = Field(None, ge=1)
    context_parallel: int | None = Field(None, ge=1)
    data_parallel: DataParallel | None = None
    data_parallel_replicate: int | None = Field(None, ge=1)
    recompute: Recompute | None = None

    def for_spec(self, model: type[StageSpec], given: dict) -> dict:
        """The defaults a spec of `model` takes: none for stages that do not train (convert's
        tensor_parallel is the layout it writes), and none of the fields `given` names."""
        if not issubclass(model, TrainSpec):
            return {}
        return {k: v for k, v in self.model_dump(exclude_none=True).items() if k not in given}


class Profile(_Section):
    executor: Literal["slurm", "local", "inline"]
    description: str = ""
    runs_dir: str | None = Field(None, description="job run folders (shared by all nodes); "
                                 "default $LMFORGE_HOME/jobs; ~ and $VARS are expanded")
    python: str | None = Field(None, description="python on the nodes (default: this interpreter)")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the job "
                             "starts (module load, activating an environment)")
    env: dict[str, str | int | float] = Field(default_factory=dict,
                                              description="environment of every rank's engine")
    resources: Resources = Resources()
    layout: LayoutDefaults = LayoutDefaults()
    requeue: Requeue = Requeue()
    slurm: SlurmSettings | None = None
    container: Container | None = Field(None, description="the image stages run in "
                                        "(docs/container.md)")

    _source: str = PrivateAttr("<profile>")
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _slurm_only_for_slurm(self) -> "Profile":
        if self.slurm is not None and self.executor != "slurm":
            raise ValueError(f"a slurm section needs executor: slurm (not {self.executor})")
        if self.container is not None and self.executor == "inline":
            raise ValueError("executor inline runs the stage in this Python process: no container")
        if self.container and self.container.runtime == "pyxis" and self.executor != "slurm":
            raise ValueError(f"container runtime pyxis is a Slurm plugin: it needs executor: slurm "
                             f"(not {self.executor}); use apptainer or podman")
        return self

    @property
    def source(self) -> str:
        return self._source

    @property
    def slurm_settings(self) -> SlurmSettings:
        return self.slurm or SlurmSettings()

    def where(self, *field: str) -> str:
        """`file:line` of a field (or of its closest parent present in the file)."""
        for n in range(len(field), 0, -1):
            if field[:n] in self._lines:
                return f"{self._source}:{self._lines[field[:n]]}"
        return self._source

    def runs_root(self) -> Path:
        if self.runs_dir:
            return Path(os.path.expandvars(self.runs_dir)).expanduser()
        return Path(os.environ.get("LMFORGE_HOME", "lmforge-home")) / "jobs"

    def environment(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.env.items()}


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(name_or_path: str | Path | None = None) -> Path:
    """A shipped profile's file by name, or the given file; default: $LMFORGE_CLUSTER_PROFILE, else
    `local`."""
    name = str(name_or_path or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE)
    if "/" in name or name.endswith((".yaml", ".yml")):
        return Path(name)
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ProfileError(f"unknown cluster profile {name!r}: not a file, and not one of "
                           f"{', '.join(available_profiles())} (in {PROFILES_DIR})")
    return path


def load_profile(name_or_path: str | Path | None = None) -> Profile:
    path = profile_path(name_or_path)
    try:
        data, lines = read_config(path)
    except SpecError as exc:
        raise ProfileError(str(exc)) from None
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(format_validation_error(exc, str(path), lines)) from None
    profile._source, profile._lines = str(path), lines
    return profile
