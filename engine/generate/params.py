"""Sampling parameters as vLLM's `SamplingParams` defines them (same names, same meaning), and a
completion. Torch-free: specs, forms and the server's request models use them.

Order of application to a step's logits, as vLLM's sampler: repetition penalty (prompt and output
tokens), frequency and presence penalties (output tokens), then greedy argmax when temperature is
0; otherwise temperature, min-p, top-k, top-p, and a draw from the row's own random generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """How to continue one prompt (vLLM's names and defaults, except max_tokens)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(1, ge=1, description="completions per prompt")
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus: the smallest set of tokens "
                         "whose probability reaches top_p")
    top_k: int = Field(0, ge=-1, description="the k most likely tokens only; 0 or -1: all")
    min_p: float = Field(0.0, ge=0, le=1, description="drop tokens less likely than min_p × "
                         "the most likely one's probability")
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages tokens already in "
                                      "the prompt or output (logit / p if positive, × p if not)")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="subtracted from a token's "
                                     "logit once per time it occurs in the output")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="subtracted from a token's "
                                    "logit if it occurs in the output")
    max_tokens: int = Field(256, ge=1, description="new tokens at most")
    stop: list[str] = Field(default_factory=list, description="stop strings (not included in "
                            "the output)")
    stop_token_ids: list[int] = Field(default_factory=list, description="stop tokens besides "
                                      "EOS (kept in token_ids, not in the text)")
    ignore_eos: bool = Field(False, description="keep going after EOS (fixed-length outputs)")
    seed: int | None = Field(None, description="the prompt's own random seed: its completions "
                             "do not depend on the batch it lands in; None: drawn")
    logprobs: bool = Field(False, description="the log-probability (raw model distribution) of "
                           "each generated token")


@dataclass
class Completion:
    """One generated continuation of a prompt."""

    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[float] | None = None
    prompt_tokens: int = 0
