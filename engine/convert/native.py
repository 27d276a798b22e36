"""Native checkpoints as conversion source and target: model weights only (fp32 master weights,
no optimizer), written as iteration 0 with the engine's own checkpoint code, so that pretrain /
finetune `load` them like any checkpoint they wrote themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from engine.convert.hf import read_json_object
from engine.errors import InputError
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.spec import format_validation_error
from engine.checkpoint.store import checkpoint_path, load_checkpoint, read_meta, save_checkpoint

MODEL_CONFIG = "model_config.json"  # as the checkpoint code writes it


def load_native(folder: Path) -> tuple[ModelConfig, LlamaModel, dict[str, Any], Path]:
    """(config, model in fp32 on the CPU, meta.json, checkpoint root) of the latest checkpoint
    under `folder`, or of `folder` itself when it is an iter_* folder."""
    path = checkpoint_path(folder)
    file = path / MODEL_CONFIG
    try:
        cfg = ModelConfig.model_validate(read_json_object(file))
    except ValidationError as exc:
        raise InputError(format_validation_error(exc, str(file))) from None
    # Built for the CPU: a flash-attn checkpoint converts on a machine without flash-attn.
    with torch.device("meta"):
        model = LlamaModel(cfg.model_copy(update={"attention_backend": "sdpa"}))
    model.to_empty(device="cpu")
    load_checkpoint(path, model, restore_rng=False)
    return cfg, model.eval(), read_meta(path), path.parent


def write_native(folder: Path, model: LlamaModel, cfg: ModelConfig, meta: dict[str, Any]) -> Path:
    """`folder`/iter_0000000 + latest_checkpointed_iteration.txt; returns the iteration folder."""
    return save_checkpoint(folder, 0, model, None, meta, cfg.model_dump(mode="json"))
