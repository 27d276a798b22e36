"""A stage's output location: the one its spec names (the registry's `output_field`), or the
one the task chooses by fingerprint; and clearing it for a forced re-run.

Two output shapes exist (engine/manifest.py): a folder with `manifest.json` inside, and a token
dataset prefix `<p>` (stages of kind `dataset`) with `<p>.manifest.json` beside its `.bin/.idx`
files. A location holds a complete artifact exactly when `engine.manifest.complete` says so: its
manifest (written last) is there and every file it lists has its recorded size. Whatever a spec names for a stage to write must lie inside LMFORGE_HOME
(`check_written`); its inputs may lie anywhere.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from engine.manifest import manifest_path, read_manifest
from engine.registry import get_stage
from tasks.fields import get_field, set_field
from tasks.home import artifact_folder, inside_home

PREFIX_NAME = "data"  # a dataset artifact's prefix inside its folder: <folder>/data.bin, ...
UNSET = "<chosen by the task>"  # stands in for the output while the spec is validated
ALSO_WRITTEN = ("metrics_file",)  # spec fields besides the output that name a file to write


def _is_prefix(stage: str) -> bool:
    return get_stage(stage).kind == "dataset"


def given_location(stage: str, spec: dict[str, Any]) -> str | None:
    return get_field(spec, get_stage(stage).output_field)


def with_location(stage: str, spec: dict[str, Any], location: str) -> dict[str, Any]:
    return set_field(spec, get_stage(stage).output_field, location)


def check_written(stage: str, spec: dict[str, Any]) -> None:
    """SpecError unless every location the spec names for writing lies inside LMFORGE_HOME
    (symlinks and `..` resolved): checked before anything is submitted or removed."""
    for field in (get_stage(stage).output_field, *ALSO_WRITTEN):
        path = get_field(spec, field)
        if path and path != UNSET:
            inside_home(path, f"<{stage} spec>: {field}")


def auto_location(stage: str, fingerprint: str) -> str:
    folder = artifact_folder(stage, fingerprint)
    return str(folder / PREFIX_NAME) if _is_prefix(stage) else str(folder)


def lease_path(location: str) -> Path:
    return Path(f"{location}.lease")


def remove(stage: str, location: str) -> None:
    """Clear `location` for a forced re-run: the manifest goes first (so nothing half-removed
    ever looks complete), then the files. A training folder goes entirely (no resume)."""
    path = Path(location)
    if _is_prefix(stage):
        manifest = read_manifest(path)
        manifest_path(path).unlink(missing_ok=True)
        for name in (manifest.files if manifest else {}):
            (path.parent / name).unlink(missing_ok=True)
        return
    if path.exists():
        doomed = path.with_name(f"{path.name}.removed-{uuid.uuid4().hex[:8]}")
        os.replace(path, doomed)
        shutil.rmtree(doomed)
