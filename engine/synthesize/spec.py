"""The synthesize stage's spec: torch-free, so that listing stages, the CLI's help and the flows'
checks never import torch (nor vLLM: whether it is installed is looked up, not imported)."""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import CliVariadicArg

from engine.data.tokenize import resolve_inputs
from engine.formats import tokenizer_path
from engine.generate.params import SamplingParams
from engine.spec import StageSpec

_NOT_OUTPUT = {"affects_output": False}
_INPUT = {"input": True}
class CookbookSampling(SamplingParams):
    """vLLM's sampling parameters with the Megatron Cookbook's defaults (temperature 0.7, top-p
    0.9, 4,096 new tokens), except its repetition penalty of 2.0: vLLM's penalty divides the
    positive logits (multiplies the negative ones) of every token already seen, and at 2.0 that
    bends ordinary text away from common words; 1.0 leaves the teacher's distribution alone.
    Defaults of a subclass, not a default instance: a spec that sets one field keeps the others."""

    temperature: float = Field(0.7, ge=0, description="0: greedy")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus: the smallest set of tokens "
                         "whose probability reaches top_p")
    max_tokens: int = Field(4096, ge=1, description="new tokens at most")


class Filters(BaseModel):
    """Which completions are dropped after generation, each check switchable; a completion is
    counted under the first check it fails, in this order."""

    model_config = ConfigDict(extra="forbid")

    empty: bool = Field(True, description="drop completions that are empty or whitespace only")
    min_tokens: int = Field(0, ge=0, description="drop completions of fewer tokens; 0: off")
    max_tokens: int | None = Field(None, ge=1, description="drop completions of more tokens; "
                                   "None: off")
    max_repeated_ngrams: float | None = Field(
        0.5, gt=0, le=1, description="drop completions whose word n-grams are repeats beyond "
        "this fraction (a decoding loop); None: off")
    ngram: int = Field(3, ge=1, description="n of max_repeated_ngrams")
    exact_duplicates: bool = Field(True, description="drop a completion whose text was kept "
                                   "already")
    near_duplicates: bool = Field(True, description="drop a completion whose MinHash (word "
                                  "shingles) is near one kept already (LSH, datasketch)")
    near_threshold: float = Field(0.85, gt=0, lt=1, description="estimated Jaccard similarity "
                                  "from which two completions are near duplicates")
    num_perm: int = Field(128, ge=16, description="MinHash permutations")
    shingle_words: int = Field(5, ge=1, description="words per shingle")


class Spec(StageSpec):
    """Continue the first tokens of each corpus document with a teacher model (engine or vLLM
    backend), in resumable shards, data parallel over ranks; filter and write the completions as
    a JSONL corpus."""

    input: CliVariadicArg[list[str]] = Field(description="JSONL corpus files (.jsonl, .jsonl.gz), "
                                             "folders of shards or globs", json_schema_extra=_INPUT)
    text_key: str = Field("text", description="JSON field holding a document's text")
    id_key: str | None = Field(None, description="JSON field holding a document's id; None: "
                               "<file name>:<line>")
    teacher: str = Field(description="HF model folder or native checkpoint (root or iter_*)",
                         json_schema_extra=_INPUT)
    tokenizer: str | None = Field(None, description="default: the teacher's own",
                                  json_schema_extra=_INPUT)
    output: str = Field(description="corpus folder (resumes the shards a killed run left there)",
                        json_schema_extra=_NOT_OUTPUT)
    prefix_tokens: int = Field(128, ge=1, description="prompt: the document's first tokens in "
                               "the teacher's tokenizer, decoded for the row's prefix text")
    short_documents: Literal["skip", "whole"] = Field(
        "skip", description="documents of fewer tokens than prefix_tokens: skipped (counted), "
        "or used whole as the prefix")
    add_bos: bool = Field(True, description="the prompt starts with the tokenizer's BOS")
    sampling: CookbookSampling = Field(
        default_factory=CookbookSampling, description="vLLM's sampling parameters; max_tokens "
        "is cut to what the teacher's context leaves after the prompt; seed: set `seed` instead")
    seed: int = Field(1234, description="each prompt's own seed derives from it and the "
                      "document's index: rows do not depend on shards, ranks or batches")
    backend: Literal["auto", "engine", "vllm"] = Field(
        "auto", description="vllm: vLLM's offline LLM (HF teachers); engine: lmforge's "
        "generator; auto: vllm when it imports and a GPU is present, else engine")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per rank the teacher is "
                                      "split over")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of GPU "
                                          "memory for weights and KV cache",
                                          json_schema_extra=_NOT_OUTPUT)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="compute dtype; auto: bf16 on GPU, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=_NOT_OUTPUT)
    max_batch_tokens: int = Field(1 << 18, gt=0, description="engine: tokens per batch (prompt "
                                  "and KV cache)", json_schema_extra=_NOT_OUTPUT)
    shard_documents: int = Field(1024, ge=1, description="documents per work shard: the unit of "
                                 "resume and of the ranks' split")
    filters: Filters = Field(default_factory=Filters)
    samples: int = Field(20, ge=0, description="kept completions shown in samples.json (and "
                         "MLflow's table)", json_schema_extra=_NOT_OUTPUT)
    progress: bool = Field(True, json_schema_extra=_NOT_OUTPUT)

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one input is needed")
        return v

    @field_validator("sampling")
    @classmethod
    def _no_sampling_seed(cls, v: CookbookSampling) -> CookbookSampling:
        if v.seed is not None:
            raise ValueError("sampling.seed: set `seed` instead (every prompt gets its own seed, "
                             "derived from it)")
        return v

    @model_validator(mode="after")
    def _vllm_installed(self) -> Spec:
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("backend: vllm is not installed here (pip install vllm, or "
                             "lmforge[gpu]); choose backend engine or auto")
        return self


def input_paths(spec: Spec) -> dict[str, str]:
    """The corpus, the teacher and its tokenizer (engine.lineage)."""
    paths = {f"input[{i}]": str(p) for i, p in enumerate(resolve_inputs(spec.input))}
    paths["teacher"] = spec.teacher
    tokenizer = tokenizer_path(spec.teacher, spec.tokenizer)
    if tokenizer is not None:
        paths["tokenizer"] = str(tokenizer)
    return paths
