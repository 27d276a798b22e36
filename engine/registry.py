"""The one table of stages. A stage is its typed spec (a StageSpec whose module also holds
`input_paths(spec) -> {name: path}`, what engine.lineage fingerprints), its work (`run(spec) ->
Manifest`), the kind of artifact it writes, the dotted spec field naming where that goes and,
optionally, the manifest summary's keys that describe the artifact (a model's shape, token ids)
rather than measure it, so that tracking records them as parameters, not metrics. A resumable
stage also names the spec field holding its checkpoint folder: cluster/ reads the latest iteration
there to record where each attempt starts.

The CLI, cluster/, tasks/ and flows/ all go through it, so a new stage is one engine module plus
one line here. A command (the server) is run by the CLI the same way but writes no artifact, so
cluster/, tasks/ and flows/ never see it. Spec modules never import torch and work modules are
imported only to run: listing stages, reading their help and checking specs stay fast, and the
flow process never loads torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Command:
    """What the CLI runs: a spec (its flags) and `run(spec)`."""

    name: str
    spec_ref: str  # "module:Class"
    run_ref: str   # "module:function"

    @property
    def spec(self) -> type:
        return _load(self.spec_ref)

    @property
    def run(self) -> Callable:
        return _load(self.run_ref)

    @property
    def doc(self) -> str:
        """What the stage does: its spec's docstring, whole."""
        return " ".join((self.spec.__doc__ or "").split())

    def output(self, spec) -> str | None:
        """Where the command writes: nowhere (a stage says where its artifact goes)."""
        return None


@dataclass(frozen=True)
class Stage(Command):
    kind: str
    output_field: str
    settings: tuple[str, ...] = ()
    checkpoint_field: str | None = None

    def input_paths(self, spec) -> dict[str, str]:
        """What the stage reads for `spec`, by input name (the names of its fingerprints)."""
        paths = importlib.import_module(self.spec_ref.partition(":")[0]).input_paths(spec)
        return {name: str(path) for name, path in paths.items()}

    def fingerprint(self, spec) -> tuple[str, dict[str, str]]:
        """The fingerprint the stage's manifest will carry for `spec`, computed before running
        it, and its input fingerprints (engine.lineage)."""
        from engine.lineage import stage_fingerprint

        return stage_fingerprint(self.name, spec, self.input_paths(spec))

    def output(self, spec) -> str | None:
        """Where the stage writes its artifact for `spec` (a folder, or a dataset prefix)."""
        return _field(spec, self.output_field)

    def checkpoint_dir(self, spec) -> str | None:
        """Where a resumable stage keeps the checkpoints it resumes from; None for the others."""
        return _field(spec, self.checkpoint_field) if self.checkpoint_field else None


def _field(spec, dotted: str):
    value = spec
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


TRAINING_SIZE = ("iterations", "tokens", "parameters")  # what a trained checkpoint is, not a score
_TABLE = [
    Stage("generate-corpus", "engine.data.synthetic:Spec", "engine.data.synthetic:run",
          "corpus", "output", ("shards", "documents")),
    Stage("train-tokenizer", "engine.data.train_tokenizer:Spec", "engine.data.train_tokenizer:run",
          "tokenizer", "output", ("vocab_size",)),
    Stage("tokenize", "engine.data.tokenize:Spec", "engine.data.tokenize:run",
          "dataset", "output_prefix", ("tokenizer",)),
    Stage("merge", "engine.data.merge:Spec", "engine.data.merge:run", "dataset", "output_prefix"),
    Stage("convert", "engine.convert.spec:Spec", "engine.convert.stage:run",  # kind "checkpoint"
          "hf-model", "save_dir", ("model", "token_ids", "parameters")),  # for a native target
    Stage("pretrain", "engine.train.spec:PretrainSpec", "engine.train.pretrain:run",
          "checkpoint", "checkpoint.save", TRAINING_SIZE, "checkpoint.save"),
    Stage("finetune", "engine.train.spec:FinetuneSpec", "engine.train.finetune:run",
          "checkpoint", "checkpoint.save", TRAINING_SIZE, "checkpoint.save"),
    Stage("distill", "engine.train.spec:DistillSpec", "engine.train.distill:run",
          "checkpoint", "checkpoint.save", TRAINING_SIZE, "checkpoint.save"),
    Stage("reshard", "engine.reshard.spec:Spec", "engine.reshard.stage:run", "checkpoint",
          "output", ("format", "iteration", "parameters", "optimizer", "world_size", "layout",
                     "source")),
    Stage("extend", "engine.extend.spec:Spec", "engine.extend.stage:run", "checkpoint",
          "output", ("max_position_embeddings", "rope_scaling", "max_abs_logit_change")),
    Stage("prune", "engine.prune.spec:Spec", "engine.prune.stage:run", "checkpoint", "output",
          ("parameters", "shape", "method", "prune_type", "depth_method", "removed")),
    Stage("evaluate", "engine.evaluate.spec:Spec", "engine.evaluate.stage:run",
          "eval-report", "output"),
    Stage("synthesize", "engine.synthesize.spec:Spec", "engine.synthesize.stage:run",
          "corpus", "output", ("teacher", "backend", "shards")),
]
STAGES: dict[str, Stage] = {stage.name: stage for stage in _TABLE}
COMMANDS: dict[str, Command] = {
    "serve": Command("serve", "engine.serve.spec:Spec", "engine.serve.server:run"),
    "plan": Command("plan", "engine.plan.spec:Spec", "engine.plan.command:run"),
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    return STAGES[name]
