"""The convert stage's spec: torch-free, so that listing stages, the CLI's help and the flows'
checks never import torch."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from engine.convert.megatron_layout import layout_problems, source_config
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


Format = Literal["hf", "native", "megatron", "megatron-epfl", "mcore-dist"]
MEGATRON_TARGETS = ("megatron", "mcore-dist")
MEGATRON_SOURCES = ("megatron", "megatron-epfl", "mcore-dist")


class Spec(StageSpec):
    """Convert between HF model folders, native checkpoints and Megatron checkpoints (per-rank
    files, EPFL's layout of them, torch_dist folders). The result is checked against its source
    by logits before it is renamed into place; over tolerance, nothing is left at the output
    path."""

    load_dir: str = Field(description="source: HF model folder, native or Megatron checkpoint "
                                      "folder (its latest iteration) or one iteration's folder",
                          json_schema_extra={"input": True})
    save_dir: str = Field(description="output folder (must not exist or be empty)",
                          json_schema_extra={"affects_output": False})
    source_format: Format = Field(description="hf, native, megatron (per-rank torch files), "
                                              "megatron-epfl or mcore-dist (torch_dist)")
    target_format: Format = Field(description="hf, native, megatron or mcore-dist")
    dtype: Literal["bf16", "fp16", "fp32"] | None = Field(
        None, description="HF / Megatron output dtype; default: as the source stores its "
                          "weights (fp32 for native sources). Native checkpoints always hold "
                          "fp32 weights")
    tensor_parallel: int = Field(1, ge=1, description="Megatron output: tensor-parallel ranks "
                                                      "(must divide heads, KV groups, FFN)")
    pipeline_parallel: int = Field(1, ge=1, description="Megatron output: pipeline stages "
                                                        "(must divide the layers)")
    virtual_pipeline_parallel: int = Field(
        1, ge=1, description="megatron output: model chunks per pipeline rank, as Megatron-LM's "
                             "interleaved schedule (--num-layers-per-virtual-pipeline-stage) "
                             "saves them (model0, model1, ...); pipeline_parallel x this must "
                             "divide the layers")
    make_vocab_size_divisible_by: int = Field(
        128, ge=1, description="Megatron output: the vocabulary is padded to a multiple of "
                               "this x tensor_parallel")
    megatron_norm_names: Literal["local", "te"] = Field(
        "local", description="megatron output: the norms named as megatron-core's local spec "
                             "(input_layernorm, pre_mlp_layernorm) or Transformer Engine's "
                             "(linear_qkv.layer_norm_weight, linear_fc1.layer_norm_weight)")
    megatron_names: Literal["mcore", "legacy"] = Field(
        "mcore", description="megatron output: the tensors named as megatron-core's GPTModel "
                             "names them (decoder.layers.N.self_attention.linear_qkv, ...) or as "
                             "Megatron-LM's legacy GPT model saves them, nested dicts (language_"
                             "model.encoder.layers.N.self_attention.query_key_value, ...: "
                             "--use-legacy-models, the Megatron Cookbook's fork); legacy needs "
                             "RoPE base 10000 and no RoPE scaling but linear")
    vocab_size: int | None = Field(
        None, gt=0, description="Megatron source: the real vocabulary size, the rest of the "
                                "padded rows cut off; default: the args' vocab_size, else the "
                                "tokenizer's (tokenizer.json), else all rows kept")
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
    def _fields_fit_formats(self) -> Spec:
        if self.dtype is not None and self.target_format == "native":
            raise ValueError("dtype applies to HF and Megatron output only: native checkpoints "
                             "hold fp32 master weights")
        if self.target_format == "megatron-epfl":
            raise ValueError("megatron-epfl is a source format only: write megatron (megatron-"
                             "core names) instead")
        megatron_out = self.target_format in MEGATRON_TARGETS
        changed = [name for name in ("tensor_parallel", "pipeline_parallel",
                                     "make_vocab_size_divisible_by")
                   if getattr(self, name) != type(self).model_fields[name].default]
        if changed and not megatron_out:
            raise ValueError(f"{', '.join(changed)} apply to Megatron output (target_format "
                             f"megatron or mcore-dist) only")
        only_megatron = [name for name in ("megatron_norm_names", "megatron_names",
                                           "virtual_pipeline_parallel")
                         if getattr(self, name) != type(self).model_fields[name].default]
        if only_megatron and self.target_format != "megatron":
            raise ValueError(f"{', '.join(only_megatron)} apply to target_format megatron only "
                             "(mcore-dist stores Transformer Engine's names, every layer in one "
                             "tensor, whatever the layout)")
        if self.megatron_names == "legacy" and self.megatron_norm_names != "local":
            raise ValueError("megatron_norm_names te is for megatron-core names: the legacy "
                             "model's norms are input_norm / post_attention_norm")
        if self.vocab_size is not None and self.source_format not in MEGATRON_SOURCES:
            raise ValueError("vocab_size applies to Megatron sources only")
        return self

    @model_validator(mode="after")
    def _layout_fits_source(self) -> Spec:
        """Checked where the source's config is visible, so a layout that cannot hold the model
        is refused before a job is queued."""
        if self.target_format in MEGATRON_TARGETS:
            cfg = source_config(self.load_dir, self.source_format)
            problems = layout_problems(cfg, self.tensor_parallel, self.pipeline_parallel,
                                       self.virtual_pipeline_parallel,
                                       self.megatron_names == "legacy") if cfg else []
            if problems:
                raise ValueError(f"{self.load_dir}: {'; '.join(problems)}")
        return self


def input_paths(spec: Spec) -> dict[str, str]:
    """The source model and, when given, the tokenizer shipped with the result (engine.lineage)."""
    paths = {"source": spec.load_dir}
    if spec.tokenizer:
        paths["tokenizer"] = spec.tokenizer
    return paths
