"""Input fingerprints: the same value before a stage runs (so the orchestration layer can find an
artifact it already built) and in the manifest the stage writes.

An input that is an artifact is identified by its manifest's fingerprint; anything else (a raw
corpus file, a foreign Megatron dataset, a downloaded HF model) by a sha256 of its content. Paths
themselves never enter a fingerprint: the same bytes moved elsewhere are the same input.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from engine.errors import InputError
from engine.manifest import Manifest, fingerprint, read_manifest, sha256_file

_CHUNK = 1 << 22


def artifact_manifest(path: str | Path) -> Manifest | None:
    """The manifest that describes `path`: its own (a folder's, a dataset prefix's), or for a
    tokenized dataset `<p>_<key>_document` the one its tokenize run wrote at `<p>.manifest.json`."""
    path = Path(path)
    own = read_manifest(path)
    if own is not None:
        return own
    stem, sep, _ = path.name.rpartition("_document")
    if sep and "_" in stem:
        parent = read_manifest(path.with_name(stem.rsplit("_", 1)[0]))
        if parent is not None and f"{path.name}.bin" in parent.files:
            return parent
    return None


def content_hash(path: str | Path) -> str:
    """sha256 of a file, of a dataset prefix's .idx and .bin, or of a folder (names and bytes of
    every file in it, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path).sha256
    idx, bin_ = Path(f"{path}.idx"), Path(f"{path}.bin")
    files: list[tuple[str, Path]]
    if idx.is_file() and bin_.is_file():
        files = [("idx", idx), ("bin", bin_)]
    elif path.is_dir():
        files = [(str(p.relative_to(path)), p) for p in sorted(path.rglob("*")) if p.is_file()]
    else:
        raise InputError(f"{path}: no such file, folder or dataset")
    h = hashlib.sha256()
    for name, file in files:
        h.update(name.encode() + b"\0" + sha256_file(file).sha256.encode())
    return h.hexdigest()


def input_fingerprint(path: str | Path) -> str:
    manifest = artifact_manifest(path)
    return manifest.fingerprint if manifest else content_hash(path)


def stage_inputs(input_paths: dict[str, Any]) -> dict[str, str]:
    """{name: path} -> {name: fingerprint}."""
    return {name: input_fingerprint(p) for name, p in input_paths.items()}


def stage_fingerprint(stage: str, spec, input_paths: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The fingerprint a stage's manifest will carry, and the input fingerprints behind it."""
    inputs = stage_inputs(input_paths)
    return fingerprint(stage, spec.fingerprint_fields(), inputs), inputs
