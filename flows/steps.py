"""The steps flows are made of — prepare data, train, evaluate — each a few stage tasks wired
together. Shared by the lifecycle flow and the smaller flows, so that both run the same stages
with the same specs (and so hit the same cache). No ML here: only which stage gets which input.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, NamedTuple

from engine.formats import model_format
from flows.params import (DataParams, EvalParams, ExportOptions, ReshardOptions,
                          SynthesizeOptions, TokenizeOptions, TrainParams)
from flows.runner import Runner
from tasks.artifact import ArtifactRef
from tasks.comparison import publish_comparison
from tasks.fields import merged
from tasks.models import resolve_model

Refs = dict[str, ArtifactRef]


class Data(NamedTuple):
    dataset: str            # indexed dataset prefix
    tokenizer: str | None   # what it was tokenized with (None: unknown, a given dataset)


class Model(NamedTuple):
    path: str               # HF folder, or native checkpoint when not exported
    hf: bool


async def prepare_data(runner: Runner, data: DataParams, refs: Refs,
                       base: Model | None = None) -> Data:
    """corpus (generated | given) -> tokenizer (given | an HF base model's | trained) ->
    tokenize each shard (concurrently) -> merge."""
    tokenizer = data.tokenizer or (base.path if base and base.hf else None)
    if data.dataset:
        return Data(data.dataset, tokenizer)
    corpus = data.corpus
    if corpus is None:
        refs["generate-corpus"] = ref = await runner.stage("generate-corpus", merged(data.generate))
        corpus = ref.path
    if tokenizer is None:
        refs["train-tokenizer"] = ref = await runner.stage(
            "train-tokenizer", merged(data.train_tokenizer, input=[corpus]))
        tokenizer = ref.path
    dataset = await tokenize_files(runner, runner.files(corpus), tokenizer, data.tokenize, refs)
    return Data(dataset, tokenizer)


async def tokenize_files(runner: Runner, files: list[str], tokenizer: str,
                         options: TokenizeOptions, refs: Refs, name: str = "") -> str:
    """Each file tokenized (a job each, concurrently), then merged: the dataset prefix. Refs
    `tokenize[i]` and `merge`, after `name` when given ("synthetic merge")."""
    parts = await asyncio.gather(*(
        runner.stage("tokenize", merged(options, input=[file], tokenizer=tokenizer),
                     label=f"tokenize {Path(file).name}") for file in files))
    prefix = f"{name} " if name else ""
    refs.update({f"{prefix}tokenize[{i}]": part for i, part in enumerate(parts)})
    refs[f"{prefix}merge"] = ref = await runner.stage(
        "merge", {"input": [dataset for part in parts for dataset in part.datasets()]},
        label=f"{prefix}merge")
    return ref.path


def given_model(uri: str | None) -> Model | None:
    """A model given by folder or registry URI (resolved to its folder), or None."""
    if uri is None:
        return None
    path = resolve_model(uri)
    return Model(path, hf=model_format(Path(path)) == "hf")


async def native_checkpoint(runner: Runner, model: Model, refs: Refs,
                            name: str = "convert (import)") -> str:
    """`model` as a native checkpoint: an HF model converted (ref `name`), a native one as it
    is."""
    if not model.hf:
        return model.path
    refs[name] = ref = await runner.stage(
        "convert", {"load_dir": model.path, "source_format": "hf", "target_format": "native"},
        label="convert HF to native")
    return ref.path


async def export_model(runner: Runner, export: ExportOptions, checkpoint: str,
                       tokenizer: str | None, refs: Refs) -> Model:
    """The native `checkpoint` as an HF folder (with `tokenizer`, None: its own)."""
    refs["convert"] = ref = await runner.stage(
        "convert", merged(export, load_dir=checkpoint, source_format="native",
                          target_format="hf", tokenizer=tokenizer),
        label="convert native to HF")
    return Model(ref.path, hf=True)


async def train_model(runner: Runner, training: TrainParams, data: Data, base: Model | None,
                      refs: Refs) -> Model:
    """(HF base -> native) -> pretrain | finetune -> (native -> HF)."""
    load = await native_checkpoint(runner, base, refs) if base else None
    stage = "finetune" if load else "pretrain"
    spec = merged(training.options, data__blend=[data.dataset], load=load)
    if load:
        spec["model"] = None  # the base's architecture
    refs[stage] = trained = await runner.stage(stage, spec)
    if training.export is None:
        return Model(trained.path, hf=False)
    return await export_model(runner, training.export, trained.path, data.tokenizer, refs)


async def finetune_or_distill(runner: Runner, spec: dict[str, Any], refs: Refs,
                              label: str) -> ArtifactRef:
    """`distill` when the spec has a teacher, else `finetune`; in `refs` under the stage's name."""
    stage = "distill" if spec.get("distill") else "finetune"
    refs[stage] = trained = await runner.stage(stage, spec, label=label)
    return trained


async def evaluate_model(runner: Runner, evaluation: EvalParams, model: Model,
                         tokenizer: str | None, refs: Refs) -> ArtifactRef:
    """Evaluate `model` (with `tokenizer`, None: its own); without ppl data given, on held-out
    generated stories."""
    ppl = evaluation.options.ppl
    if ppl is None:
        heldout = evaluation.heldout  # named apart from the training stories: metrics say which
        name = heldout.name if "name" in heldout.model_fields_set else "heldout"
        refs["generate-corpus (held-out)"] = ref = await runner.stage(
            "generate-corpus", merged(heldout, name=name), label="held-out corpus")
        ppl = runner.files(ref.path)
    refs["evaluate"] = ref = await runner.stage(
        "evaluate", merged(evaluation.options, load_dir=model.path, ppl=ppl, tokenizer=tokenizer))
    await runner.evaluated(ref)
    return ref


async def evaluate_side_by_side(runner: Runner, evaluation: EvalParams,
                                models: dict[str, tuple[Model, str | None]], refs: Refs,
                                parent_run: str | None, key: str, description: str) -> str:
    """Each model (label: (model, its tokenizer; None: its own)) evaluated alike, its refs
    named `evaluate: <label>` (the held-out corpus once: it is the same), the last one's
    evaluation the flow's `evaluate` (its headline figures); the comparison published
    (tasks/comparison.py) and returned ("" in a dry run)."""
    reports = []
    for label, (model, tokenizer) in models.items():
        found: Refs = {}
        ref = await evaluate_model(runner, evaluation, model, tokenizer, found)
        refs |= {f"{step}: {label}" if step == "evaluate" else step: r
                 for step, r in found.items()}
        reports.append(ref.path)
    refs["evaluate"] = refs.pop(f"evaluate: {label}")
    if runner.dry:
        return ""
    return await publish_comparison(parent_run, list(models), reports, key, description)


async def synthesize_corpus(runner: Runner, options: SynthesizeOptions, corpus: list[str],
                            teacher: Model, tokenizer: str | None, refs: Refs) -> ArtifactRef:
    """The teacher's continuations of the corpus's documents: a corpus (JSONL shards)."""
    refs["synthesize"] = ref = await runner.stage(
        "synthesize", merged(options, input=corpus, teacher=teacher.path, tokenizer=tokenizer))
    return ref


async def reshard_checkpoint(runner: Runner, options: ReshardOptions, checkpoint: str,
                             refs: Refs) -> ArtifactRef:
    """The checkpoint rewritten for the layout `options` names over the stage's ranks (the
    run's resources for `reshard`), or consolidated into one file."""
    refs["reshard"] = ref = await runner.stage("reshard", merged(options, input=checkpoint))
    return ref
