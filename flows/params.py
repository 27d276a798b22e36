"""Flow parameters: pydantic models, so the Prefect UI draws a form for them and a run with a bad
value (a negative `iters`) is refused before it starts. Each stage's options are its engine spec
less the fields the flow wires (tasks/options.py); the defaults are the CPU demo: a tiny Llama on
a generated corpus."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.resources import Resources
from engine.registry import STAGES
from engine.train.spec import DistillSection
from tasks.options import section_options, stage_options

CorpusOptions = stage_options("generate-corpus", frozenset({"output"}), "CorpusOptions")
TokenizerOptions = stage_options("train-tokenizer", frozenset({"input", "output"}), "TokenizerOptions")
TokenizeOptions = stage_options("tokenize", frozenset({"input", "output_prefix", "tokenizer"}),
                                "TokenizeOptions")
TrainOptions = stage_options("pretrain", frozenset({"load", "data.blend", "checkpoint.save"}),
                             "TrainOptions")
ExportOptions = stage_options("convert", frozenset({"load_dir", "save_dir", "source_format",
                                                   "target_format", "tokenizer"}), "ExportOptions")
EvaluateOptions = stage_options("evaluate", frozenset({"load_dir", "output", "tokenizer"}),
                                "EvaluateOptions")
SynthesizeOptions = stage_options("synthesize", frozenset({"input", "teacher", "tokenizer",
                                                           "output"}), "SynthesizeOptions")
ReshardOptions = stage_options("reshard", frozenset({"input", "output"}), "ReshardOptions")
PruneOptions = stage_options("prune", frozenset({"input", "output", "calibration"}),
                             "PruneOptions")
DistillOptions = section_options(DistillSection, frozenset({"teacher"}), "DistillOptions")


def tiny_llama() -> BaseModel:
    """~0.2M parameters: the loss falls visibly within 200 CPU steps of a minute or two."""
    return TrainOptions(
        model={"vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_layers": 2,
               "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 128},
        data={"split": "98,2,0", "seq_length": 128},
        optim={"lr": 3e-3, "min_lr": 3e-4, "warmup_iters": 20},
        checkpoint={"keep_last": 1}, eval={"interval": 50, "iters": 2},
        iters=200, micro_batch_size=8, global_batch_size=8, precision="fp32", log_interval=10)


def cookbook_extension() -> BaseModel:
    """The Megatron Cookbook's context-extension training (Llama-2-7B, 4k -> 8k by position
    interpolation): 1,000 steps of 128 sequences of 8,192 tokens, lr 2e-5 -> 2e-6 cosine after
    30 warmup steps, selective recompute."""
    return TrainOptions(data={"seq_length": 8192}, iters=1000, global_batch_size=128,
                        micro_batch_size=1, optim={"lr": 2e-5, "min_lr": 2e-6,
                                                   "schedule": "cosine", "warmup_iters": 30},
                        recompute="selective")


def demo_pruning() -> BaseModel:
    """The demo's model (tiny_llama) to about half its non-embedding parameters by width."""
    return PruneOptions(hidden_size=48, num_kv_heads=1, intermediate_size=128,
                        calibration_samples=64, seq_length=128, progress=False)


def demo_night() -> dict:
    """The demo's nightly distillation: short continuations, a short finetune of the pruned
    model with KD from the full one (the flow's other arguments come from the demo's runs)."""
    options = tiny_llama()
    options = options.model_copy(update={"iters": 40, "eval": options.eval.model_copy(
        update={"interval": None})})
    return {"synthesis": SynthesizeOptions(prefix_tokens=32, sampling={"max_tokens": 64},
                                           progress=False),
            "training": NightlyTraining(options=options)}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataParams(_Params):
    """Where the training tokens come from. Giving a stage's result switches that stage off."""
    dataset: str | None = Field(None, description="an existing indexed dataset prefix: skips "
                                "every data stage")
    corpus: str | None = Field(None, description="JSONL file, folder or glob; None: generate one")
    generate: CorpusOptions = Field(default_factory=lambda: CorpusOptions(documents=4000))
    tokenizer: str | None = Field(None, description="SentencePiece .model, HF tokenizer.json or "
                                  "HF folder; None: the base model's (finetuning an HF model), "
                                  "else trained on the corpus")
    train_tokenizer: TokenizerOptions = Field(default_factory=TokenizerOptions)
    tokenize: TokenizeOptions = Field(
        default_factory=lambda: TokenizeOptions(append_eod=True, progress=False),
        description="applied to each corpus shard, each shard a job of its own")


class TrainParams(_Params):
    """Pretraining from scratch, or finetuning when the flow is given a base model."""
    options: TrainOptions = Field(default_factory=tiny_llama,
                                  description="model is ignored when finetuning (the base's)")
    export: ExportOptions | None = Field(default_factory=ExportOptions,
                                         description="convert the result to an HF folder; None: "
                                         "keep the native checkpoint only")


class RecoveryParams(_Params):
    """Finetuning the pruned model back: by distillation from its unpruned parent (Minitron), or
    by plain cross-entropy on the data."""
    options: TrainOptions = Field(default_factory=tiny_llama,
                                  description="the finetune's options (model: ignored, the "
                                  "pruned checkpoint's)")
    distill: DistillOptions | None = Field(
        default_factory=lambda: DistillOptions(alpha=0.0),
        description="logit distillation from the parent (the teacher); alpha 0: KD alone. "
                    "None: plain cross-entropy")
    export: ExportOptions | None = Field(default_factory=ExportOptions,
                                         description="convert the recovered model to an HF "
                                         "folder; None: keep the native checkpoint only")


class NightlyTraining(_Params):
    """The night's distillation: the champion finetuned on the new shards blended with the
    teacher's continuations of them, with logit KD from the teacher (or without)."""
    options: TrainOptions = Field(default_factory=tiny_llama,
                                  description="the finetune's options (model: ignored, the "
                                  "champion's; data.blend: the night's datasets)")
    synthetic_weight: float = Field(0.5, ge=0, lt=1, description="share of the teacher's "
                                    "continuations in the blend (with synthesis)")
    distill: DistillOptions | None = Field(
        default_factory=lambda: DistillOptions(alpha=0.5),
        description="logit distillation from the teacher (same tokenizer as the student); "
                    "None: cross-entropy on the data alone")
    export: ExportOptions = Field(default_factory=ExportOptions,
                                  description="the HF export that is registered")


class PromotionParams(_Params):
    """When a night's model replaces the champion."""
    metric: str = Field("ppl/", description="an evaluation metric, or the start of its name "
                        "(the first that matches)")
    min_improvement: float = Field(0.0, ge=0, description="the fraction of the champion's "
                                   "value the candidate must gain (0.01: 1% better)")
    higher_is_better: bool | None = Field(None, description="None: lower for ppl, loss, nll, "
                                          "bits_per_byte, higher otherwise")


class EvalParams(_Params):
    options: EvaluateOptions = Field(default_factory=lambda: EvaluateOptions(progress=False),
                                     description="ppl None: perplexity on held-out stories")
    heldout: CorpusOptions = Field(
        default_factory=lambda: CorpusOptions(documents=200, shards=1, seed=4321),
        description="the held-out stories (another seed than training's corpus; files named "
                    "heldout-NNN.jsonl unless `name` is set)")


class RunParams(_Params):
    """Where and how the stages run."""
    profile: str | None = Field(None, description="cluster profile name or YAML path; None: "
                                "$LMFORGE_CLUSTER_PROFILE, else local (this machine)")
    resources: dict[str, Resources] = Field(default_factory=dict, description="per stage name: "
                                            "what to override of the profile's resources")
    force: bool | list[str] = Field(False, description="rebuild even when a finished artifact "
                                    "exists: true for every stage, or a list of stage names")
    layout: Literal["given", "recommend"] = Field(
        "given", description="recommend: training stages take the planner's fastest layout "
        "that fits the GPUs of their resources (resources.gpu), instead of their own layout "
        "fields (docs/planner.md)")

    @field_validator("resources", "force")
    @classmethod
    def _known_stages(cls, value):
        names = value if isinstance(value, (dict, list)) else []
        unknown = sorted(set(names) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
        return value

    def forced(self, stage: str) -> bool:
        return self.force is True or (isinstance(self.force, list) and stage in self.force)
