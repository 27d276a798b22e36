"""A model read from either format, for the stages that take both and write a native checkpoint
(prune, extend): its config, the model (fp32, CPU), the meta to carry on, the folder read; and
the tokenizer that travels with it, copied beside the new checkpoint."""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint.store import checkpoint_path
from engine.convert.carry import copy_files, token_ids, tokenizer_files
from engine.convert.hf import load_hf
from engine.convert.native import load_native
from engine.formats import TOKENIZER_DIR, copy_tokenizer, model_format
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel


def load_model(path: str) -> tuple[ModelConfig, LlamaModel, dict, Path]:
    """(config, model, the meta to carry on, the folder read: the HF folder or iter_* folder)."""
    if model_format(Path(path)) == "hf":
        cfg, hf, model, _ = load_hf(Path(path))
        return cfg, model, {"hf_token_ids": token_ids(hf, Path(path))}, Path(path)
    cfg, model, meta, _ = load_native(Path(path))
    return cfg, model, meta, checkpoint_path(path)


def copy_model_tokenizer(source: Path, root: Path) -> None:
    """The tokenizer of the model read from `source` into `root`/tokenizer/ (none if it has none)."""
    if model_format(source) == "hf":
        copy_files(tokenizer_files(source), root / TOKENIZER_DIR)
    else:
        copy_tokenizer(source, root)
