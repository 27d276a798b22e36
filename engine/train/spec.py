"""The typed spec of the training stages (pretrain, finetune): one pydantic model, sections as
in a Megatron command line, validated before any job is queued."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import CliVariadicArg

from engine.data.samples import check_long_documents, parse_blend
from engine.model.config import ModelConfig
from engine.errors import InputError, SpecError
from engine.parallel.layout import (V_SHAPED, DataParallel, Layout, PipelineSchedule,
                                    Recompute, check_layout, check_schedule,
                                    context_parallel_errors, layout_for, model_errors)
from engine.reshard.spec import source_files
from engine.spec import StageSpec
from engine.train.context import ContextSection, extended_config
from engine.train.schedule import LRSchedule

_NOT_OUTPUT = {"affects_output": False}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # as StageSpec


class DataSection(_Section):
    blend: CliVariadicArg[list[str]] = Field(
        min_length=1, description="dataset prefixes, optionally weighted: 0.3 A 0.7 B (Megatron's "
        "form) or A", json_schema_extra={"input": True})
    split: str = Field("969,30,1", description="train,valid,test weights over documents")
    seq_length: int = Field(gt=0)
    eod_id: int | None = Field(None, description="EOD token id; default: from the dataset manifest")
    eod_mask_loss: bool = Field(False, description="positions whose target is EOD carry no loss")
    documents: Literal["all", "long"] = Field(
        "all", description="all: every document, packed; long: only documents of at least "
        "seq_length + 1 tokens (a whole window each: long-context training); the count is logged "
        "and recorded")
    cache_dir: str | None = Field(None, description="where sample indices go if the data folder "
                                  "is read-only", json_schema_extra=_NOT_OUTPUT)

    @model_validator(mode="after")
    def _long_documents_exist(self) -> "DataSection":
        if self.documents == "long":
            try:
                check_long_documents(self.blend, self.split, self.seq_length + 1)
            except InputError as exc:
                raise ValueError(f"documents 'long': {exc}; lower seq_length or use documents "
                                 f"'all'") from None
        return self

    @property
    def min_document_length(self) -> int:
        """The fewest tokens a document needs to be trained on."""
        return self.seq_length + 1 if self.documents == "long" else 0


class OptimSection(LRSchedule):
    weight_decay: float = Field(0.1, ge=0, description="applied to matrices, not norms or biases")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    clip_grad: float | None = Field(1.0, gt=0, description="max global gradient norm; None: off")


class CheckpointSection(_Section):
    save: str = Field(description="checkpoint folder: the stage's output, resumed from if it "
                      "holds checkpoints", json_schema_extra=_NOT_OUTPUT)
    interval: int | None = Field(None, ge=1, description="save every N iterations (and at the end)")
    keep_last: int | None = Field(2, ge=1, description="checkpoints kept; None: all")


class EvalSection(_Section):
    interval: int | None = Field(None, ge=1, description="validate every N iterations (and at the end)")
    iters: int = Field(2, ge=1, description="validation batches per evaluation")
    initial: bool = Field(False, description="also validate before the first step (logged at step 0)")


class DistillSection(_Section):
    teacher: str = Field(description="native checkpoint or iter_* folder of the frozen teacher "
                         "(a Hugging Face model: `convert` it to native first); same tokenizer "
                         "as the student", json_schema_extra={"input": True})
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the cross-entropy with the "
                         "data; 1 − alpha weighs τ²·KL(teacher ‖ student)")
    temperature: float = Field(1.0, gt=0, description="τ: both models' logits divided by it "
                               "in the KL")
    top_k: int | None = Field(None, ge=1, description="KL over the teacher's k largest logits "
                              "renormalised (sparse KD); None: the full vocabulary")


class Float8Section(_Section):
    """FP8 matmuls (torchao's float8 training): each block's linear layers compute in float8 with
    dynamic scales, over whatever `precision` keeps as weights (fp32 masters either way);
    attention, norms, the embedding and the head stay in bf16."""
    recipe: Literal["tensorwise", "rowwise"] = Field(
        "tensorwise", description="scaling: one scale per tensor (fastest), or per row "
        "(more accurate; torchao's 'rowwise')")
    bf16_blocks: int = Field(1, ge=0, description="the first and the last this many blocks "
                             "keep bf16 matmuls (the most sensitive to rounding)")


class TrainSpec(StageSpec):
    model: ModelConfig | None = Field(None, description="architecture (None: the loaded checkpoint's)")
    load: str | None = Field(None, description="checkpoint or iter_* folder to start from",
                             json_schema_extra={"input": True})
    data: DataSection
    optim: OptimSection = OptimSection()
    checkpoint: CheckpointSection
    eval: EvalSection = EvalSection()
    iters: int = Field(gt=0, description="training iterations (optimizer steps)")
    micro_batch_size: int = Field(1, gt=0)
    global_batch_size: int = Field(gt=0, description="samples per optimizer step, all ranks")
    precision: Literal["bf16", "bf16-master", "fp16", "fp32"] = Field(
        "bf16-master", description="bf16-master (default with ddp, whole model per rank): bf16 "
                                   "weights, fp32 master weights, moments and gradient sums in "
                                   "the optimizer; bf16 (default with fsdp, tensor or pipeline "
                                   "parallel)/fp16: autocast over fp32 weights and optimizer "
                                   "state")
    float8: Float8Section | None = Field(None, description="FP8 matmuls in the blocks "
                                         "(torchao); None: bf16")
    seed: int = 1234
    data_parallel: DataParallel = Field("ddp", description="ddp, or fsdp (sharded, ZeRO-3 style)")
    cpu_offload: bool = Field(False, description="fsdp: fp32 weights, gradients and optimizer "
                              "state in (pinned) host memory, each block's weights copied in "
                              "for its forward and backward, the optimizer step on the CPU: a "
                              "model too big for the GPU, at the cost of PCIe traffic",
                              json_schema_extra=_NOT_OUTPUT)
    overlap_grad_reduce: bool = Field(
        True, description="ddp: reduce gradients in buckets while the backward runs; false: "
        "the backward waits for each bucket's reduction (what overlapping buys, measured)",
        json_schema_extra=_NOT_OUTPUT)
    data_parallel_replicate: int = Field(
        1, ge=1, description="fsdp: replicas of the sharded model (HSDP: sharded within a "
        "replica, gradients averaged across)", json_schema_extra=_NOT_OUTPUT)
    tensor_parallel: int = Field(1, ge=1, description="ranks each layer's matmuls are split "
                                 "over (Megatron's TP)", json_schema_extra=_NOT_OUTPUT)
    sequence_parallel: bool = Field(True, description="with tensor_parallel: norms and the "
                                    "residual stream split along the sequence",
                                    json_schema_extra=_NOT_OUTPUT)
    context_parallel: int = Field(1, ge=1, description="ranks each sequence is split over "
                                  "(attention gathers its keys and values from them): "
                                  "sequences too long for one GPU", json_schema_extra=_NOT_OUTPUT)
    pipeline_parallel: int = Field(1, ge=1, description="ranks the layers are split over, "
                                   "in pipeline stages", json_schema_extra=_NOT_OUTPUT)
    pipeline_schedule: PipelineSchedule = Field(
        "1f1b", description="with pipeline_parallel: gpipe, 1f1b, interleaved-1f1b or "
        "interleaved-zb (virtual_stages ≥ 2), zbv or dualpipev (virtual_stages 2); "
        "the micro-batches of a step (global batch / (micro batch × data-parallel ranks)) "
        "run through it", json_schema_extra=_NOT_OUTPUT)
    virtual_stages: int = Field(1, ge=1, description="pipeline stages per pipeline rank (the "
                                "interleaved and V schedules)", json_schema_extra=_NOT_OUTPUT)
    pipeline_layers: list[int] | None = Field(
        None, description="layers of each pipeline stage, in order (pipeline_parallel × "
        "virtual_stages counts summing to num_layers); default: even, a remainder to the "
        "middle stages", json_schema_extra=_NOT_OUTPUT)
    recompute: Recompute = Field("none", description="activation recompute per block: none, "
                                 "selective (keep matmul and attention outputs) or full",
                                 json_schema_extra=_NOT_OUTPUT)
    fused_loss: bool = Field(True, description="chunked LM head + cross-entropy, no full logits")
    distill: DistillSection | None = Field(None, description="knowledge distillation from a "
                                           "frozen teacher; None: plain cross-entropy")
    compile: bool = Field(False, description="torch.compile each transformer block",
                          json_schema_extra=_NOT_OUTPUT)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=_NOT_OUTPUT)
    log_interval: int = Field(10, ge=1, json_schema_extra=_NOT_OUTPUT)
    max_nan_skips: int = Field(3, ge=0, description="non-finite steps skipped before stopping")
    metrics_file: str | None = Field(None, description="JSON-lines metrics; default <save>/metrics.jsonl",
                                     json_schema_extra=_NOT_OUTPUT)

    def fingerprint_fields(self) -> dict:
        """The blend's datasets enter through engine.lineage (by content); its weights here."""
        fields = super().fingerprint_fields()
        fields["data"]["blend_weights"] = [w for w, _ in parse_blend(self.data.blend)]
        return fields

    @model_validator(mode="before")
    @classmethod
    def _default_precision(cls, data):
        """bf16 master weights need a whole model per rank under DDP; FSDP, TP and PP keep fp32
        weights (sharded) and compute under autocast."""
        if isinstance(data, dict) and "precision" not in data:
            return {**data, "precision": default_precision(data)}
        return data

    @model_validator(mode="after")
    def _master_weights_need_ddp(self) -> "TrainSpec":
        if self.precision == "bf16-master" and self.data_parallel != "ddp":
            raise ValueError("precision bf16-master needs data_parallel ddp (FSDP keeps its own "
                             "fp32 shards: use bf16)")
        if self.precision == "bf16-master" and (self.tensor_parallel > 1
                                                or self.pipeline_parallel > 1):
            raise ValueError("precision bf16-master is for a whole model per rank (DDP): with "
                             "tensor_parallel or pipeline_parallel use bf16 (fp32 weights, "
                             "bf16 compute)")
        return self

    @model_validator(mode="after")
    def _overlap_switch_is_ddp(self) -> "TrainSpec":
        if not self.overlap_grad_reduce and (self.data_parallel != "ddp"
                                             or self.tensor_parallel > 1
                                             or self.pipeline_parallel > 1):
            raise ValueError("overlap_grad_reduce false is for DDP alone (data_parallel ddp, "
                             "no tensor_parallel or pipeline_parallel): FSDP2 always overlaps "
                             "its gathers and reduce-scatters")
        return self

    @model_validator(mode="after")
    def _offload_needs_fsdp(self) -> "TrainSpec":
        if not self.cpu_offload:
            return self
        if self.data_parallel != "fsdp":
            raise ValueError("cpu_offload needs data_parallel fsdp (its shards are what moves "
                             "to host memory)")
        if self.tensor_parallel > 1 or self.pipeline_parallel > 1:
            raise ValueError("cpu_offload is not supported with tensor_parallel or "
                             "pipeline_parallel yet: use data_parallel fsdp alone")
        return self

    @model_validator(mode="after")
    def _float8_fields(self) -> "TrainSpec":
        if self.float8 is None:
            return self
        if self.tensor_parallel > 1:
            raise ValueError("float8 with tensor_parallel is not supported yet (its sharded "
                             "linears need float8 parallel styles): use data_parallel fsdp")
        if self.precision in ("fp16", "fp32"):
            raise ValueError(f"float8 computes over bf16 (precision bf16 or bf16-master), not "
                             f"{self.precision}")
        return self

    @model_validator(mode="after")
    def _pipeline_fields(self) -> "TrainSpec":
        """The schedule's stages per rank; the pipeline fields mean nothing without a pipeline."""
        if self.pipeline_parallel == 1:
            if self.virtual_stages > 1 or self.pipeline_layers is not None:
                raise ValueError("virtual_stages and pipeline_layers need pipeline_parallel > 1")
            return self
        if not self.fused_loss:
            raise ValueError("pipeline_parallel needs fused_loss (the last stage's head runs "
                             "fused with the loss)")
        check_layout(self.pipeline_schedule, self.pipeline_parallel, self.virtual_stages)
        if self.pipeline_schedule in V_SHAPED and (self.eval.interval or self.eval.initial):
            raise ValueError(f"validation under pipeline_schedule {self.pipeline_schedule} is not "
                             "supported: torch's V schedules cannot run forward only; set "
                             "eval.interval null or use interleaved-1f1b")
        return self

    @model_validator(mode="after")
    def _model_divides(self) -> "TrainSpec":
        """A model that comes from `load` is checked when the checkpoint is read."""
        if self.tensor_parallel > 1 and not self.fused_loss:
            raise ValueError("tensor_parallel needs fused_loss (the vocab-parallel head)")
        if self.model is not None:
            errors = self.layout_errors(self.model)
            if errors:
                raise ValueError("; ".join(errors))
        return self

    @model_validator(mode="after")
    def _distillation_layout(self) -> "TrainSpec":
        if self.distill is None:
            return self
        if not self.fused_loss:
            raise ValueError("distill needs fused_loss (the chunked heads of both models)")
        if self.tensor_parallel > 1 or self.pipeline_parallel > 1:
            raise ValueError("distill is not supported with tensor_parallel or "
                             "pipeline_parallel yet: use data parallelism (ddp or fsdp)")
        return self

    @model_validator(mode="after")
    def _context_parallel_fits(self) -> "TrainSpec":
        """Each rank takes 2 chunks of every sequence, split again over TP's sequence shards."""
        cp = self.context_parallel
        if cp == 1:
            return self
        if self.pipeline_parallel > 1:
            raise ValueError("context_parallel is not supported with pipeline_parallel yet")
        seq, tp = self.data.seq_length, self.tensor_parallel
        if seq % (2 * cp):
            raise ValueError(f"data.seq_length {seq} is not a multiple of 2 × context_parallel "
                             f"= {2 * cp}: each rank holds two chunks of every sequence")
        if self.sequence_parallel and (seq // cp) % tp:
            raise ValueError(f"data.seq_length / context_parallel = {seq // cp} is not a "
                             f"multiple of tensor_parallel {tp} (sequence parallelism splits "
                             f"it)")
        return self

    @property
    def pipeline_stages(self) -> int:
        return self.pipeline_parallel * self.virtual_stages

    def layout_errors(self, model: ModelConfig) -> list[str]:
        layout = Layout(pp=self.pipeline_parallel, tp=self.tensor_parallel)
        errors = model_errors(layout, model.num_heads, model.num_kv_heads,
                              model.intermediate_size, model.vocab_size, model.num_layers,
                              self.pipeline_stages, self.pipeline_layers,
                              model.tie_word_embeddings)
        return errors + (context_parallel_errors(model) if self.context_parallel > 1 else [])

    def layout(self, world_size: int) -> Layout:
        """How `world_size` ranks divide (ValueError naming the numbers if they do not)."""
        return layout_for(world_size, self.tensor_parallel, self.pipeline_parallel,
                          self.data_parallel, self.data_parallel_replicate, self.context_parallel)

    def check_world(self, world_size: int) -> None:
        layout = self.layout(world_size)
        if self.global_batch_size % (self.micro_batch_size * layout.dp):
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size} × {layout.dp} "
                             f"data-parallel ranks ({layout.describe()})")
        if layout.pp > 1:  # a step's micro-batches are the pipeline's
            try:
                check_schedule(self.pipeline_schedule, layout.pp, self.virtual_stages,
                               self.micro_batches(layout))
            except SpecError as exc:
                raise ValueError(f"{exc} (global_batch_size {self.global_batch_size} / "
                                 f"(micro_batch_size {self.micro_batch_size} × {layout.dp} "
                                 f"data-parallel ranks))") from None

    def micro_batches(self, layout: Layout) -> int:
        """Micro-batches per rank and step (gradient accumulation, or the pipeline's)."""
        return self.global_batch_size // (self.micro_batch_size * layout.dp)

    @model_validator(mode="after")
    def _source(self) -> "TrainSpec":
        if self.model is None and self.load is None:
            raise ValueError("give the architecture (model) or a checkpoint to start from (load)")
        return self

    @model_validator(mode="after")
    def _sequences_fit_the_model(self) -> "TrainSpec":
        """Positions beyond max_position_embeddings were never meant to be seen (RoPE scaling
        included: HF's max_position_embeddings is the extended length). A model that comes from
        `load` is checked when the checkpoint is read."""
        if self.model is not None and self.data.seq_length > self.model.max_position_embeddings:
            raise ValueError(f"data.seq_length ({self.data.seq_length}) is above "
                             f"model.max_position_embeddings ({self.model.max_position_embeddings})")
        return self


class PretrainSpec(TrainSpec):
    """Train from scratch (or continue from `load` with its optimizer and iteration count)."""


class FinetuneSpec(TrainSpec):
    """Start from the weights of `load`, with a fresh optimizer and iteration count."""

    context: ContextSection | None = Field(None, description="extend the context: RoPE "
                                           "rescaled for a longer max_length, trained at it")

    @model_validator(mode="after")
    def _context_fits(self) -> "FinetuneSpec":
        """The extension against the checkpoint's shape where it is visible (the loop checks it
        again when it reads the checkpoint), and the sequences against the new length."""
        if self.context is None:
            return self
        if self.context.method == "dynamic":
            raise ValueError("context.method 'dynamic' is not trained: its frequencies follow "
                             "each sequence's length. Use the extend stage alone, or train "
                             "with linear, yarn or llama3")
        found = source_files(self.load) if self.load else None
        if found is not None:
            extended_config(found[1], self.context)
        if self.data.seq_length > self.context.max_length:
            raise ValueError(f"data.seq_length ({self.data.seq_length}) is above "
                             f"context.max_length ({self.context.max_length})")
        return self

    @model_validator(mode="after")
    def _needs_load(self) -> "FinetuneSpec":
        if self.load is None:
            raise ValueError("load is needed: the checkpoint to start from")
        return self


class DistillSpec(FinetuneSpec):
    """Train a student (`load`) against a frozen teacher (`distill.teacher`) on a blend of
    datasets with set weights (original and synthetic): loss α·CE on the data + (1 − α)·τ²·KL
    from the teacher's logits; α 1 is the data's CE alone. Teacher and student may differ in
    size and share the tokenizer; a teacher with another tokenizer can only supply synthetic
    data (synthesize, then finetune on it)."""

    distill: DistillSection = Field(description="the teacher and the loss")


def input_paths(spec: TrainSpec) -> dict[str, str]:
    """The datasets of the blend, the checkpoint started from and the teacher (see
    engine.lineage)."""
    paths = {f"data[{i}]": prefix for i, (_, prefix) in enumerate(parse_blend(spec.data.blend))}
    if spec.load:
        paths["load"] = spec.load
    if spec.distill:
        paths["distill.teacher"] = spec.distill.teacher
    return paths


def default_precision(data: dict) -> str:
    """The precision a spec gets when it names none: bf16 master weights for whole-model DDP,
    bf16 autocast over fp32 weights otherwise."""
    return "bf16-master" if _whole_model_ddp(data) else "bf16"


def _whole_model_ddp(data: dict) -> bool:
    """Whether raw spec fields ask for DDP over whole-model ranks (flags arrive as strings; a bad
    value counts as whole and is named by its field's own check)."""
    try:
        split = int(data.get("tensor_parallel", 1)) > 1 or int(data.get("pipeline_parallel", 1)) > 1
    except (TypeError, ValueError):
        split = False
    return data.get("data_parallel", "ddp") == "ddp" and not split
