"""What a Megatron tensor × pipeline layout demands of a model, and Megatron's padded
vocabulary: torch-free, so that the convert spec checks a requested layout before a job is
queued."""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import InputError
from engine.model.config import ModelConfig

LEGACY_ROPE_BASE = 10000.0


def padded_vocab(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's rule: the vocabulary grows to a multiple of make_vocab_size_divisible_by × TP,
    so every tensor-parallel rank holds an equal slice of the embedding and of the head."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def layout_problems(cfg: ModelConfig, tensor_parallel: int, pipeline_parallel: int,
                    virtual_pipeline: int = 1, legacy: bool = False) -> list[str]:
    """Each number of the model that the layout does not divide, said as such; with `legacy`
    (Megatron-LM's legacy GPT model), also the RoPE it cannot compute."""
    tp, pp, vp = tensor_parallel, pipeline_parallel, virtual_pipeline
    stages = (f"pipeline_parallel {pp}" if vp == 1 else
              f"pipeline_parallel {pp} x virtual_pipeline_parallel {vp} ({pp * vp} model chunks)")
    wanted = [(tp, "tensor_parallel", cfg.num_heads, "num_heads (attention heads)"),
              (tp, "tensor_parallel", cfg.num_kv_heads,
               "num_kv_heads (query groups: each rank holds whole groups)"),
              (tp, "tensor_parallel", cfg.intermediate_size, "intermediate_size (FFN width)")]
    problems = [f"{name} {split} does not divide {what} {number}"
                for split, name, number, what in wanted if number % split]
    if cfg.num_layers % (pp * vp):
        problems.append(f"{stages} does not divide num_layers {cfg.num_layers} (equal pipeline "
                        "stages)")
    if vp > 1 and pp == 1:
        problems.append(f"virtual_pipeline_parallel {vp} needs pipeline_parallel > 1")
    if legacy:
        problems += legacy_rope_problems(cfg)
    return problems


def legacy_rope_problems(cfg: ModelConfig) -> list[str]:
    """Megatron-LM's legacy model builds its RotaryEmbedding without a base (10000, whatever
    --rotary-base says) and knows only linear scaling (--rotary-seq-len-interpolation-factor)."""
    problems = []
    if cfg.rope_theta != LEGACY_ROPE_BASE:
        problems.append(f"rope_theta {cfg.rope_theta:g}: Megatron-LM's legacy model always uses "
                        f"RoPE base {LEGACY_ROPE_BASE:g} (write megatron_names mcore)")
    if cfg.rope_scaling.type not in ("none", "linear"):
        problems.append(f"rope_scaling {cfg.rope_scaling.type}: Megatron-LM's legacy model has "
                        "linear RoPE scaling only (write megatron_names mcore)")
    return problems


def check_layout(cfg: ModelConfig, tensor_parallel: int, pipeline_parallel: int,
                 virtual_pipeline: int = 1, legacy: bool = False) -> None:
    problems = layout_problems(cfg, tensor_parallel, pipeline_parallel, virtual_pipeline, legacy)
    if problems:
        layout = f"TP {tensor_parallel} x PP {pipeline_parallel}" + (
            f" x VP {virtual_pipeline}" if virtual_pipeline > 1 else "")
        raise InputError(f"Megatron layout {layout}{' (legacy names)' if legacy else ''} does "
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
