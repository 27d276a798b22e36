"""Context extension in finetune: the loaded checkpoint's RoPE scaling rewritten for a longer
maximum length (docs/training.md, "Context extension"). Torch-free: the spec checks it against
the checkpoint's shape before a job is queued, the loop applies it when it reads the checkpoint.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.model.config import (DynamicScaling, Llama3Scaling, LinearScaling, ModelConfig,
                                 NoScaling, YarnScaling)


class ContextSection(BaseModel):
    """Context extension (finetune): the loaded checkpoint's RoPE rescaled for a longer maximum
    length, then trained at it (data.seq_length up to max_length). docs/training.md."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # as the spec's sections

    max_length: int = Field(gt=0, description="the new maximum length (max_position_embeddings; "
                            "dynamic: the checkpoint's length × factor)")
    method: Literal["linear", "dynamic", "yarn", "llama3"] = Field(
        "linear", description="linear: position interpolation (the Cookbook's); dynamic: dynamic "
        "NTK (no training: the frequencies follow each sequence's length); yarn; llama3")
    factor: float | None = Field(None, ge=1, description="RoPE scaling factor; None: max_length "
                                 "/ the checkpoint's length. linear, dynamic and yarn: must "
                                 "equal that")
    beta_fast: float = Field(32.0, gt=0, description="yarn: extrapolated above this many turns")
    beta_slow: float = Field(1.0, gt=0, description="yarn: interpolated below this many turns")
    attention_factor: float | None = Field(None, gt=0, description="yarn: attention temperature; "
                                           "None: 0.1·ln(factor) + 1")
    low_freq_factor: float = Field(1.0, gt=0, description="llama3: wavelengths above original / "
                                   "this are interpolated")
    high_freq_factor: float = Field(4.0, gt=0, description="llama3: wavelengths below original "
                                    "/ this are kept")


def original_length(cfg: ModelConfig) -> int:
    """The length a model was trained at before any extension."""
    scaling = cfg.rope_scaling
    if isinstance(scaling, (YarnScaling, Llama3Scaling)):
        return scaling.original_max_position_embeddings
    if isinstance(scaling, LinearScaling):
        return round(cfg.max_position_embeddings / scaling.factor)
    return cfg.max_position_embeddings  # plain, and dynamic NTK (HF's meaning of the field)


def extended_config(stored: ModelConfig, context: ContextSection) -> ModelConfig:
    """`stored` with the RoPE scaling and maximum length that `context` asks for. A checkpoint
    already extended so (a resumed extension) comes back as it is; ValueError naming what
    cannot be done."""
    original = original_length(stored)
    if context.max_length < original:
        raise ValueError(f"context.max_length {context.max_length} is below the checkpoint's "
                         f"length {original}")
    factor = context.factor or context.max_length / original
    if context.method != "llama3" and abs(factor * original - context.max_length) > 0.5:
        raise ValueError(f"context.factor {factor:g} × the checkpoint's length {original} is "
                         f"{factor * original:g}, not context.max_length {context.max_length} "
                         f"({context.method} stretches the positions by exactly the factor)")
    # dynamic NTK scales from max_position_embeddings by the current length (transformers and
    # vLLM read it so): it stays the trained length
    length = original if context.method == "dynamic" else context.max_length
    extended = stored.model_copy(update={"max_position_embeddings": length,
                                         "rope_scaling": _scaling(context, factor, original)})
    if not isinstance(stored.rope_scaling, NoScaling) and extended != stored:
        raise ValueError(f"the checkpoint is already extended ({stored.rope_scaling.type}, "
                         f"max_position_embeddings {stored.max_position_embeddings}); extend "
                         f"its unextended parent instead")
    return ModelConfig.model_validate(extended.model_dump())


def _scaling(context: ContextSection, factor: float, original: int):
    if context.method == "linear":
        return LinearScaling(factor=factor)
    if context.method == "dynamic":
        return DynamicScaling(factor=factor)
    if context.method == "yarn":
        return YarnScaling(factor=factor, original_max_position_embeddings=original,
                           beta_fast=context.beta_fast, beta_slow=context.beta_slow,
                           attention_factor=context.attention_factor)
    return Llama3Scaling(factor=factor, original_max_position_embeddings=original,
                         low_freq_factor=context.low_freq_factor,
                         high_freq_factor=context.high_freq_factor)
