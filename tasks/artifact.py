"""What a stage task returns: a reference to the artifact, small enough to pass between tasks and
to show in the Prefect UI — never the data itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from engine.manifest import Manifest


TRAINING_STAGES = ("distill", "finetune", "pretrain")


class ArtifactRef(BaseModel):
    stage: str
    kind: str
    path: str                      # the folder, or the dataset prefix, the stage wrote
    fingerprint: str
    cached: bool                   # found complete, not built by this run
    summary: dict[str, Any]        # the manifest's summary figures
    files: list[str]               # the manifest's file names (relative to the folder / prefix's folder)
    mlflow_run_id: str | None = None
    job_dir: str | None = None     # the cluster run folder (spec, logs) when built by this run
    registered: str | None = None  # models:/NAME/VERSION, when the flow registered it

    @classmethod
    def of(cls, location: str, manifest: Manifest, **extra: Any) -> "ArtifactRef":
        return cls(stage=manifest.stage, kind=manifest.kind, path=location,
                   fingerprint=manifest.fingerprint, summary=manifest.summary,
                   files=sorted(manifest.files), **extra)

    def datasets(self) -> list[str]:
        """The Megatron dataset prefixes of a dataset artifact (one per tokenized JSON key)."""
        folder = Path(self.path).parent
        return [str(folder / name[:-len(".bin")]) for name in self.files if name.endswith(".bin")]


def trained_ref(refs: dict[str, ArtifactRef]) -> ArtifactRef | None:
    """The checkpoint a flow trained, among its references (None if it trained none)."""
    return next((refs[stage] for stage in TRAINING_STAGES if stage in refs), None)
