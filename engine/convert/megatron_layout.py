"""What a Megatron tensor × pipeline layout demands of a model, and Megatron's padded
vocabulary: torch-free, so that the convert spec checks a requested layout before a job is
queued."""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import InputError
from engine.model.config import ModelConfig


def padded_vocab(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's rule: the vocabulary grows to a multiple of make_vocab_size_divisible_by × TP,
    so every tensor-parallel rank holds an equal slice of the embedding and of the head."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def layout_problems(cfg: ModelConfig, tensor_parallel: int, pipeline_parallel: int) -> list[str]:
    """Each number of the model that the layout does not divide, said as such."""
    tp, pp = tensor_parallel, pipeline_parallel
    wanted = [(tp, "tensor_parallel", cfg.num_heads, "num_heads (attention heads)"),
              (tp, "tensor_parallel", cfg.num_kv_heads,
               "num_kv_heads (query groups: each rank holds whole groups)"),
              (tp, "tensor_parallel", cfg.intermediate_size, "intermediate_size (FFN width)"),
              (pp, "pipeline_parallel", cfg.num_layers, "num_layers (equal pipeline stages)")]
    return [f"{name} {split} does not divide {what} {number}"
            for split, name, number, what in wanted if number % split]


def check_layout(cfg: ModelConfig, tensor_parallel: int, pipeline_parallel: int) -> None:
    problems = layout_problems(cfg, tensor_parallel, pipeline_parallel)
    if problems:
        raise InputError(f"Megatron layout TP {tensor_parallel} x PP {pipeline_parallel} does "
                         f"not fit the model: {'; '.join(problems)}")


def source_config(load_dir: str, source_format: str) -> ModelConfig | None:
    """The model config of an HF or native source, read from its JSON where it is visible (at
    submit time); None when it is not (the stage checks again once it has read the source)."""
    folder = Path(load_dir)
    try:
        if source_format == "hf" and (folder / "config.json").is_file():
            return ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        if source_format == "native":
            for file in (folder / "model_config.json", *_latest(folder)):
                if file.is_file():
                    return ModelConfig.model_validate(json.loads(file.read_text()))
    except (ValueError, TypeError, OSError):  # the stage reports what is wrong when it runs
        return None
    return None


def _latest(root: Path) -> list[Path]:
    latest = root / "latest_checkpointed_iteration.txt"
    text = latest.read_text().strip() if latest.is_file() else ""
    return [root / f"iter_{int(text):07d}" / "model_config.json"] if text.isdigit() else []
