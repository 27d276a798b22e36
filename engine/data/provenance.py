"""Which tokenizer made an artifact, where that is recorded: a tokenized dataset's manifest
names its tokenizer's sha256; a checkpoint has the tokenizer `convert` copied beside it, or else
the datasets its training spec names. Stages that put two artifacts together (a teacher and its
student's data, a checkpoint and its calibration data) compare these."""

from __future__ import annotations

import logging
from pathlib import Path

from engine.data.samples import parse_blend
from engine.errors import InputError
from engine.formats import CONFIG, TOKENIZER_DIR
from engine.lineage import artifact_manifest
from engine.manifest import sha256_file
from engine.reshard.spec import source_dir, source_files

log = logging.getLogger(__name__)


def dataset_tokenizers(blend: list[str]) -> set[str]:
    """The sha256 of the tokenizer each dataset of `blend` was tokenized with, where recorded."""
    shas = set()
    for _, prefix in parse_blend(blend):
        manifest = artifact_manifest(prefix)
        sha = ((manifest.summary.get("tokenizer") or {}) if manifest else {}).get("sha256")
        if sha:
            shas.add(sha)
    return shas


def checkpoint_tokenizers(path: Path) -> set[str]:
    """The sha256s of the tokenizer files recorded for the model `path` (an HF folder, a native
    checkpoint folder or one of its iter_* folders): those copied beside it (in it), or the
    tokenizer of the datasets it was trained on. Torch-free: flows check with it too."""
    path = Path(path)
    folder = path if (path / CONFIG).is_file() else None
    checkpoint = source_dir(path) if folder is None else None
    if checkpoint is not None and (checkpoint.parent / TOKENIZER_DIR).is_dir():
        folder = checkpoint.parent / TOKENIZER_DIR
    if folder is not None:
        return {sha256_file(f).sha256
                for f in folder.iterdir() if f.is_file() and f.name.startswith("tokenizer")}
    found = source_files(path)
    blend = (((found[0] if found else {}).get("spec") or {}).get("data") or {}).get("blend")
    return dataset_tokenizers(blend) if blend else set()


def check_same_tokenizer(model: Path, datasets: list[str], what: str, model_role: str,
                         data_role: str) -> None:
    """Refuse a model and datasets recorded with different tokenizers (an InputError starting
    with `what`); warn when either is not recorded: then only sizes and id ranges can be."""
    ours, theirs = checkpoint_tokenizers(model), dataset_tokenizers(datasets)
    if not ours or not theirs:
        log.warning("%s: the tokenizer of the %s is not recorded; it cannot be compared", what,
                    model_role if not ours else data_role)
    elif not ours & theirs:
        raise InputError(f"{what}: the {model_role} and the {data_role} were made with different "
                         f"tokenizers (sha256 {sorted(s[:16] for s in ours)} vs "
                         f"{sorted(s[:16] for s in theirs)}); they must share one")
