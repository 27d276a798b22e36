"""The convert stage's spec: torch-free, so that listing stages, the CLI's help and the flows'
checks never import torch."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from engine.spec import StageSpec

TOLERANCE = 1e-4  # largest |logit difference| between a conversion's source and result (fp32)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from "5GB" (10^9, as HF's max_shard_size) / "5GiB" (2^30) / a plain number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MiB, 1000000)")
    return int(float(match[1]) * _UNITS[(match[2] or "").upper()])


Format = Literal["hf", "native"]


class Spec(StageSpec):
    """Convert an HF model folder or a native checkpoint into the other format (or HF to HF).
    The result is checked against its source by logits before it is renamed into place; over
    tolerance, nothing is left at the output path."""

    load_dir: str = Field(description="source: HF model folder, or native checkpoint folder "
                                      "(its latest iteration) or iter_* folder",
                          json_schema_extra={"input": True})
    save_dir: str = Field(description="output folder (must not exist or be empty)",
                          json_schema_extra={"affects_output": False})
    source_format: Format = Field(description="hf or native")
    target_format: Format = Field(description="hf or native")
    dtype: Literal["bf16", "fp16", "fp32"] | None = Field(
        None, description="HF output dtype; default: as the source stores its weights (fp32 for "
                          "native sources). Native checkpoints always hold fp32 weights")
    max_shard_size: str = Field("5GB", description="HF output: largest safetensors shard "
                                                   "(5GB = 5e9 bytes, 5GiB = 2^30 bytes)")
    tokenizer: str | None = Field(None, description="tokenizer folder or file to ship with the "
                                                    "model; default: the source's",
                                  json_schema_extra={"input": True})
    tolerance: float = Field(TOLERANCE, gt=0, description="largest |logit difference| allowed "
                                                          "between source and result (fp32)")

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)
        return value

    @model_validator(mode="after")
    def _dtype_for_hf(self) -> Spec:
        if self.dtype is not None and self.target_format == "native":
            raise ValueError("dtype applies to HF output only: native checkpoints hold fp32 "
                             "master weights")
        return self


def input_paths(spec: Spec) -> dict[str, str]:
    """The source model and, when given, the tokenizer shipped with the result (engine.lineage)."""
    paths = {"source": spec.load_dir}
    if spec.tokenizer:
        paths["tokenizer"] = spec.tokenizer
    return paths
