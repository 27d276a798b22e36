"""Artifact manifests (DESIGN.md §3): what a stage wrote, from what, and its fingerprint.

A stage writes its manifest last. Directory artifacts (checkpoints, HF models, reports) keep it at
`<dir>/manifest.json`; token datasets follow Megatron's prefix convention and keep it at
`<prefix>.manifest.json`, next to their `<prefix>_<key>_document.{bin,idx}` pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine import __version__
from engine.atomic import atomic_write_text
from engine.errors import InputError

HASH_THREADS = min(8, os.cpu_count() or 1)
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


def sha256_files(paths: list[Path]) -> list[FileEntry]:
    """sha256_file of each, several files at once (hashlib releases the GIL: one core each)."""
    if len(paths) < 2:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(min(HASH_THREADS, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


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


def dataset_prefix(prefix: str) -> str:
    """A dataset's output prefix, refused when it is a folder: the manifest of a prefix sits
    beside its files, but an existing folder's manifest is the one inside it (another
    artifact's, which it would overwrite)."""
    if Path(prefix).is_dir():
        raise ValueError(f"{prefix} is a folder; the output prefix names the dataset's files: "
                         f"give one inside it, e.g. {Path(prefix) / 'data'}")
    return prefix


def write_manifest(artifact: str | Path, manifest: Manifest) -> Path:
    path = manifest_path(artifact)
    atomic_write_text(path, manifest.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(artifact: str | Path) -> Manifest | None:
    """The artifact's manifest, or None when there is none. Its presence alone does not make the
    artifact complete: see `complete`."""
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid manifest: {str(exc).splitlines()[0]}") from None


def files_root(artifact: str | Path) -> Path:
    """The folder a manifest's file names are relative to: the artifact folder, or a dataset
    prefix's folder."""
    artifact = Path(artifact)
    return artifact if artifact.is_dir() else artifact.parent


def check_files(root: str | Path, files: dict[str, FileEntry], checksums: bool = True) -> None:
    """Every listed file present at its recorded size and, with `checksums`, with its recorded
    sha256; an InputError naming the first file that is not."""
    root = Path(root)
    for name, entry in files.items():
        path = root / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise InputError(f"{path}: missing (listed in the artifact's checksums)") from None
        if size != entry.bytes:
            raise InputError(f"{path}: {size} bytes, the recorded size is {entry.bytes}: the file "
                             f"is truncated or was changed")
    if checksums:
        names = list(files)
        for name, found in zip(names, sha256_files([root / name for name in names])):
            entry, actual = files[name], found.sha256
            if actual != entry.sha256:
                raise InputError(f"{root / name}: checksum mismatch (sha256 {actual[:16]}…, "
                                 f"recorded {entry.sha256[:16]}…): the file is corrupt")


def complete(artifact: str | Path) -> Manifest | None:
    """The manifest of a complete artifact — written last, readable, and every file it lists
    present at its recorded size — or None. The one test of "complete" for the engine and tasks/."""
    try:
        manifest = read_manifest(artifact)
        if manifest is not None:
            check_files(files_root(artifact), manifest.files, checksums=False)
    except InputError:
        return None
    return manifest


def verify_artifact(artifact: str | Path) -> Manifest | None:
    """Check an input artifact before it is read: every file its manifest lists, by checksum
    (an InputError naming the file otherwise). Inputs without a manifest of their own (a foreign
    model or dataset) have nothing to check against: None."""
    manifest = read_manifest(artifact)
    if manifest is not None:
        check_files(files_root(artifact), manifest.files)
    return manifest
