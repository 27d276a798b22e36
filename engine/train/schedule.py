"""Learning-rate schedules as pure functions of the iteration, so resume needs no scheduler state
beyond the iteration itself: constant, linear, cosine and WSD (warmup-stable-decay), each with
linear warmup and a floor `min_lr`."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ScheduleName = Literal["constant", "linear", "cosine", "wsd"]


class LRSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # `lr: .inf` is no schedule
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0, description="floor reached at the end of decay")
    schedule: ScheduleName = "cosine"
    warmup_iters: int = Field(0, ge=0)
    decay_iters: int | None = Field(None, ge=1, description="iterations until min_lr; default: train iters")
    wsd_decay_fraction: float = Field(0.2, gt=0, le=1,
                                      description="WSD: final fraction of decay_iters spent decaying")

    @model_validator(mode="after")
    def _floor_below_peak(self) -> "LRSchedule":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above lr ({self.lr})")
        return self

    def at(self, iteration: int, total_iters: int) -> float:
        """Learning rate for the step that produces iteration `iteration + 1` (0-based step)."""
        if self.warmup_iters and iteration < self.warmup_iters:
            return self.lr * (iteration + 1) / self.warmup_iters
        if self.schedule == "constant":
            return self.lr
        end = self.decay_iters or total_iters
        if self.schedule == "wsd":
            start = end - int(round(self.wsd_decay_fraction * end))
            start = max(start, self.warmup_iters)
        else:
            start = self.warmup_iters
        if iteration < start:
            return self.lr
        progress = min(1.0, (iteration - start) / max(1, end - start))
        if self.schedule == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * progress))
        else:  # linear, and WSD's decay phase
            factor = 1 - progress
        return self.min_lr + (self.lr - self.min_lr) * factor
