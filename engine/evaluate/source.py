"""What is evaluated: an HF model folder or a native checkpoint (root or iter_* folder), told apart
by what they hold, loaded through engine.convert, with the tokenizer that travels with them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.convert.hf import CONFIG, load_hf
from engine.convert.native import TOKENIZER_DIR, load_native
from engine.data.tokenizer import Tokenizer, load_tokenizer
from engine.errors import InputError
from engine.model.config import ModelConfig
from engine.train.checkpoint import LATEST

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class Source:
    path: Path
    format: str  # "hf" or "native"
    cfg: ModelConfig
    model: torch.nn.Module  # fp32, CPU
    tokenizer_path: Path | None

    def tokenizer(self) -> Tokenizer:
        if self.tokenizer_path is None:
            where = "" if self.format == "hf" else " in tokenizer/"
            raise InputError(f"{self.path}: no tokenizer found beside the model (tokenizer.json "
                             f"or tokenizer.model{where}); pass --tokenizer")
        return load_tokenizer(self.tokenizer_path)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def model_format(path: Path) -> str:
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
    return own if _has_tokenizer(own) else None


def load_source(load_dir: str, tokenizer: str | None = None) -> Source:
    path = Path(load_dir)
    if model_format(path) == "hf":
        cfg, _, model, _ = load_hf(path)
    else:
        cfg, model, _, _ = load_native(path)
    return Source(path, model_format(path), cfg, model, tokenizer_path(load_dir, tokenizer))
