"""The three Megatron formats behind one reader and one writer, as the convert stage and its
verification call them."""

from __future__ import annotations

from pathlib import Path

from engine.convert.mcore_dist import load_mcore_dist, write_mcore_dist
from engine.convert.megatron import load_megatron, write_megatron
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel


def load_megatron_source(fmt: str, path: Path, vocab_size: int | None = None,
                         tokenizer: Path | None = None) -> tuple[ModelConfig, LlamaModel, str]:
    """(config, model in fp32, stored dtype) of a `megatron`, `megatron-epfl` or `mcore-dist`
    checkpoint."""
    if fmt == "mcore-dist":
        return load_mcore_dist(path, vocab_size, tokenizer)
    return load_megatron(path, fmt == "megatron-epfl", vocab_size, tokenizer)


def write_megatron_target(spec, folder: Path, model: LlamaModel, dtype: str) -> list[str]:
    """The checkpoint `spec.target_format` names, in the spec's layout; the files written."""
    if spec.target_format == "mcore-dist":
        return write_mcore_dist(folder, model, spec.tensor_parallel, spec.pipeline_parallel,
                                spec.make_vocab_size_divisible_by, dtype)
    names_as = "legacy" if spec.megatron_names == "legacy" else spec.megatron_norm_names
    return write_megatron(folder, model, spec.tensor_parallel, spec.pipeline_parallel,
                          spec.make_vocab_size_divisible_by, dtype, names_as,
                          spec.virtual_pipeline_parallel)
