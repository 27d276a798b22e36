"""What is evaluated: an HF model folder or a native checkpoint (root or iter_* folder), told apart
by what they hold, loaded through engine.convert, with the tokenizer that travels with them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.convert.hf import load_hf
from engine.convert.native import load_native
from engine.data.tokenizer import Tokenizer, load_tokenizer
from engine.errors import InputError
from engine.formats import model_format, tokenizer_path
from engine.model.config import ModelConfig


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


def load_source(load_dir: str, tokenizer: str | None = None) -> Source:
    path = Path(load_dir)
    if model_format(path) == "hf":
        cfg, _, model, _ = load_hf(path)
    else:
        cfg, model, _, _ = load_native(path)
    return Source(path, model_format(path), cfg, model, tokenizer_path(load_dir, tokenizer))
