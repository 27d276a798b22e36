"""The two model formats on disk, told apart by what a folder holds, without importing torch:
an HF model folder (config.json) or a native checkpoint (its root with the latest-iteration file,
or one iter_* folder with meta.json); and where the tokenizer that travels with each lies."""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.errors import InputError
from engine.checkpoint.latest import LATEST

CONFIG = "config.json"  # an HF model folder's
TOKENIZER_DIR = "tokenizer"  # a native checkpoint root's copy of its tokenizer
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def model_format(path: Path) -> str:
    """"hf" or "native"."""
    if (path / CONFIG).is_file():
        return "hf"
    if (path / LATEST).is_file() or (path / "meta.json").is_file():
        return "native"
    raise InputError(f"{path}: not a model: neither an HF model folder ({CONFIG}) nor a native "
                     f"checkpoint ({LATEST}, or meta.json in an iter_* folder)")


def tokenizer_path(load_dir: str, tokenizer: str | None) -> Path | None:
    """The tokenizer to use: the one given, else the model's own (HF: in its folder; native:
    <checkpoint root>/tokenizer/), else None. Known before the model is loaded."""
    if tokenizer is not None:
        return Path(tokenizer)
    path = Path(load_dir)
    if model_format(path) == "hf":
        own = path
    else:
        own = (path.parent if (path / "meta.json").is_file() else path) / TOKENIZER_DIR
    return own if any((own / name).is_file() for name in _TOKENIZER_FILES) else None


def copy_tokenizer(checkpoint: Path, root: Path) -> list[Path]:
    """Copy the tokenizer that travels with the native checkpoint folder `checkpoint` (an
    iter_* folder) into `root`/tokenizer/; the files copied (none if it has none)."""
    found = checkpoint.parent / TOKENIZER_DIR
    if not found.is_dir():
        return []
    shutil.copytree(found, root / TOKENIZER_DIR)
    return sorted(p for p in (root / TOKENIZER_DIR).rglob("*") if p.is_file())
