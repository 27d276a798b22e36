"""The prune stage's spec: torch-free. Targets are checked against the source's shape where the
source is visible (engine/prune/shape.py), so impossible ones are refused before a job is
queued. The Megatron Cookbook's flags are accepted by their names."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from engine.model.config import ModelConfig
from engine.prune.shape import Targets, balance_errors, pruned_shape
from engine.reshard.spec import model_config_of
from engine.spec import StageSpec

Method = Literal["activation", "magnitude", "random"]
DepthMethod = Literal["block-importance", "ppl"]


def _cookbook(name: str, cookbook: str) -> AliasChoices:
    return AliasChoices(name, cookbook)


class Spec(StageSpec):
    """Structured pruning of a native checkpoint: hidden channels, attention heads (whole KV
    groups or query heads within groups), FFN neurons and layers, chosen by importance measured
    on calibration data (Minitron's activations), by weight magnitude, or at random (the
    Cookbook's). Writes a native checkpoint of the smaller shape, and beside it the scores and
    the indices kept, so that a user can see why."""

    input: str = Field(description="the model: a native checkpoint folder (its latest complete "
                                   "iteration), one iter_* folder, or an HF model folder",
                       json_schema_extra={"input": True})
    output: str = Field(description="output folder (must not exist or be empty)",
                        json_schema_extra={"affects_output": False})
    calibration: str = Field(description="calibration text: a tokenized dataset prefix (its "
                             ".bin/.idx), a JSONL file or a folder of them",
                             json_schema_extra={"input": True})
    calibration_samples: int = Field(1024, ge=1, description="sequences of calibration data")
    seq_length: int | None = Field(None, ge=2, description="tokens per calibration sequence "
                                   "(None: the model's context, at most 4,096)")
    text_key: str = Field("text", description="JSONL calibration: the key holding the text")
    tokenizer: str | None = Field(None, description="JSONL calibration: tokenizer file or "
                                  "folder (None: the one beside the checkpoint)",
                                  json_schema_extra={"input": True})
    method: Method = Field("activation", description="width importance: activation "
                           "(Minitron: activations on the calibration data), magnitude (weight "
                           "norms) or random (the Cookbook's)")
    depth_method: DepthMethod = Field(
        "block-importance", description="which layers go when num_layers is given: "
        "block-importance (1 − cosine similarity of a block's input and output; one pass) or "
        "ppl (greedily, the layer whose removal raises the calibration loss least, one at a "
        "time; a pass per remaining layer per layer removed)")
    hidden_size: int | None = Field(None, ge=1, description="hidden size after pruning",
                                    validation_alias=_cookbook("hidden_size",
                                                               "hidden_size_remain"))
    num_heads: int | None = Field(None, ge=1, description="query heads after pruning",
                                  validation_alias=_cookbook("num_heads",
                                                             "num_attention_heads_remain"))
    num_kv_heads: int | None = Field(None, ge=1, description="KV heads (groups) after pruning "
                                     "(None: as num_heads implies: MHA keeps them equal, GQA "
                                     "keeps its groups)")
    intermediate_size: int | None = Field(None, ge=1, description="FFN width after pruning",
                                          validation_alias=_cookbook("intermediate_size",
                                                                     "ffn_hidden_size_remain"))
    num_layers: int | None = Field(None, ge=1, description="layers after pruning, the least "
                                   "important removed (depth_method)")
    drop_layers: list[int] = Field(default_factory=list, description="layers to remove, "
                                   "numbered from 0 (the Cookbook's; instead of num_layers)")
    target_parameters: int | None = Field(None, ge=1, description="parameter count to reach: "
                                          "hidden size and FFN width not given are shrunk by "
                                          "one ratio to the largest shape at or under it")
    tensor_parallel: int = Field(1, ge=1, description="the tensor parallelism the pruned model "
                                 "will train at: divides its heads, KV heads and FFN width")
    multiple_of: int = Field(1, ge=1, description="hidden size and FFN width a multiple of "
                             "this (64 suits the GPU kernels)")
    prune_type: Literal["balance", "unbalance"] = Field(
        "balance", description="balance: each tensor-parallel rank's slice of heads and "
        "neurons keeps the same count (the Cookbook's default); unbalance: the best "
        "over the whole layer")
    rescale_norms: bool = Field(True, description="rescale each RMSNorm's weight by how the "
                                "root mean square of its input changes with the channels "
                                "removed (measured on the calibration data): exact for "
                                "channels that carry nothing")
    seed: int = Field(1234, description="method random: the draw")
    batch_size: int = Field(8, ge=1, description="calibration sequences per forward pass",
                            json_schema_extra={"affects_output": False})
    progress: bool = Field(True, description="a progress bar over the calibration pass",
                           json_schema_extra={"affects_output": False})
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the model runs: auto (a GPU when there is one), cpu or cuda",
        json_schema_extra={"affects_output": False})

    @field_validator("drop_layers", mode="before")
    @classmethod
    def _comma_list(cls, value):
        """The Cookbook writes `--drop_layers 7,13,18,24`."""
        if isinstance(value, str):
            return [part for part in value.replace(",", " ").split()]
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            return value[0].replace(",", " ").split()
        return value

    def targets(self) -> Targets:
        return Targets(self.hidden_size, self.num_heads, self.num_kv_heads, self.intermediate_size,
                       self.num_layers, tuple(self.drop_layers), self.target_parameters,
                       self.tensor_parallel, self.multiple_of)

    def pruned_shape(self, cfg: ModelConfig) -> ModelConfig:
        """The pruned model's config for source `cfg`; ValueError naming what cannot be met."""
        problems = balance_errors(cfg, self.tensor_parallel) if self.prune_type == "balance" else []
        if problems:
            raise ValueError("; ".join(problems))
        return pruned_shape(cfg, self.targets())

    @model_validator(mode="after")
    def _something_to_prune(self) -> Spec:
        if self.targets() == Targets(tensor_parallel=self.tensor_parallel,
                                     multiple_of=self.multiple_of):
            raise ValueError("nothing to prune: give hidden_size, num_heads, num_kv_heads, "
                             "intermediate_size, num_layers, drop_layers or target_parameters")
        return self

    @model_validator(mode="after")
    def _fits_source(self) -> Spec:
        found = model_config_of(self.input)
        if found is not None:
            try:
                self.pruned_shape(found)
            except ValueError as exc:
                raise ValueError(f"{self.input}: {exc}") from None
        return self


def input_paths(spec: Spec) -> dict[str, str]:
    """The source checkpoint, the calibration data and an explicit tokenizer (engine.lineage)."""
    paths = {"source": spec.input, "calibration": spec.calibration}
    if spec.tokenizer:
        paths["tokenizer"] = spec.tokenizer
    return paths
