"""Artifact manifests (DESIGN.md §3): what a stage wrote, from what, and its fingerprint.

A stage writes its manifest last. Directory artifacts (checkpoints, HF models, reports) keep it at
`<dir>/manifest.json`; token datasets follow Megatron's prefix convention and keep it at
`<prefix>.manifest.json`, next to their `<prefix>_<key>_document.{bin,idx}` pairs.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine import __version__
from engine.atomic import atomic_write_text

ArtifactKind = Literal["dataset", "checkpoint", "hf-model", "corpus", "tokenizer", "eval-report"]


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str
    bytes: int


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ArtifactKind
    stage: str
    spec: dict[str, Any]
    inputs: dict[str, str] = Field(default_factory=dict, description="input name -> fingerprint")
    fingerprint: str
    engine_version: str = __version__
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    summary: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict, description="name -> checksum")


def fingerprint(stage: str, spec_fields: dict[str, Any], input_fingerprints: dict[str, str]) -> str:
    """hash(stage, spec fields that change the output, input fingerprints, engine version)."""
    payload = json.dumps({"stage": stage, "spec": spec_fields, "inputs": input_fingerprints,
                          "engine": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> FileEntry:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return FileEntry(sha256=h.hexdigest(), bytes=size)


def manifest_path(artifact: str | Path) -> Path:
    """Where an artifact's manifest lives: inside a directory, or beside a dataset prefix."""
    artifact = Path(artifact)
    if artifact.is_dir():
        return artifact / "manifest.json"
    return artifact.with_name(artifact.name + ".manifest.json")


def write_manifest(artifact: str | Path, manifest: Manifest) -> Path:
    path = manifest_path(artifact)
    atomic_write_text(path, manifest.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(artifact: str | Path) -> Manifest | None:
    """The artifact's manifest, or None when there is none (then it is not a complete artifact)."""
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
