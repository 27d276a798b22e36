"""The lifecycle flow: a model's whole life in one run. Today:

    (generate corpus | given) -> (train tokenizer | given | the HF base model's) -> tokenize each
    shard -> merge -> (convert HF -> native, when finetuning an HF model) -> pretrain | finetune
    -> convert native -> HF -> register in MLflow -> evaluate

Each stage is switched off by giving its result instead (a corpus, a tokenizer, a dataset, a base
model) or by setting its section to None (`training`: then the data stages are not needed and the
base model, if any, is what gets evaluated; `training.export`; `evaluation`). A stage that already
ran with the same inputs and settings is not run again (the cache). `python -m flows.lifecycle`
runs the CPU demo — a tiny Llama on generated stories — and says how to look at the results.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

from prefect import flow, tags

from engine.data.synthetic import story
from flows.compress import compress
from flows.nightly_distill import nightly_distill
from flows.params import (DataParams, EvalParams, RunParams, TrainParams, demo_night,
                          demo_pruning)
from flows.runner import Runner
from flows.report import print_report
from flows.steps import Refs, evaluate_model, given_model, prepare_data, train_model
from tasks.home import lmforge_home
from tasks.models import pin
from tasks.prefect_api import prefect_api
from tasks.run_tags import tag_flow_run
from tasks.summary import publish_summary
from tasks.tracking import tracked_flow


@flow(name="lifecycle")
async def lifecycle(data: DataParams = DataParams(), base_model: str | None = None,
                    training: TrainParams | None = TrainParams(),
                    evaluation: EvalParams | None = EvalParams(),
                    register_as: str | None = "lmforge-tiny", aliases: list[str] | None = None,
                    run: RunParams = RunParams()) -> Refs:
    """From text to an evaluated, registered model; returns a reference to every artifact.

    Args:
        data: where the training tokens come from.
        base_model: finetune (or, without training, evaluate) this model: an HF folder, a native
            checkpoint, or models:/NAME/VERSION|latest|@ALIAS (the MLflow registry). None: pretrain.
        training: pretraining or finetuning, and the export to HF; None: no training.
        evaluation: None: no evaluation.
        register_as: MLflow registered model name for the exported HF model; None: not registered.
        aliases: registry aliases moved to the new version, besides `latest-lifecycle`.
        run: cluster profile, per-stage resources, forced rebuilds.
    """
    await tag_flow_run(run.profile)
    base_model = pin(base_model)  # `latest` now: the run records, and uses, that version
    args = (data, base_model, training, evaluation, register_as, aliases)
    await _steps(Runner(run, dry=True), {}, *args)  # every spec checked before the first job
    refs: Refs = {}
    with tracked_flow({"data": data, "base_model": base_model, "training": training,
                       "evaluation": evaluation, "register_as": register_as, "aliases": aliases,
                       "run": run}, refs):
        await _steps(Runner(run), refs, *args)
        await publish_summary(refs)
        return refs


async def _steps(runner: Runner, refs: Refs, data: DataParams, base_model: str | None,
                 training: TrainParams | None, evaluation: EvalParams | None,
                 register_as: str | None, aliases: list[str] | None) -> Refs:
    model = base = given_model(base_model)
    tokenizer = data.tokenizer
    if training is not None:
        prepared = await prepare_data(runner, data, refs, base)
        tokenizer = prepared.tokenizer
        model = await train_model(runner, training, prepared, base, refs)
        if model.hf:
            refs["convert"] = await runner.register(refs, register_as, base_model, aliases)
    if evaluation is not None and model is not None:
        await evaluate_model(runner, evaluation, model, None if model.hf else tokenizer, refs)
    return refs


def main() -> None:
    """The demo, tagged `demo`, on the Prefect server that scripts/server.sh runs (the
    deployments' server) when there is one, else on a temporary one: the lifecycle, then its
    model pruned to about half and recovered by distillation (the compress flow); one night of
    the nightly distillation of the pruned model on a shard of new stories; then where to
    look."""
    with prefect_api() as where, tags("demo"):
        print(f"Prefect: {where}", flush=True)
        refs = asyncio.run(lifecycle())
        small = asyncio.run(compress(refs["convert"].path, refs["merge"].path,
                                     pruning=demo_pruning(), register_as="lmforge-tiny-pruned"))
        night = asyncio.run(nightly_distill(
            drop=str(demo_drop()), teacher=refs["convert"].path,
            register_as="lmforge-tiny-pruned", bootstrap=small["convert"].registered,
            **demo_night()))
        print_report(refs, small, night)


def demo_drop(documents: int = 100) -> Path:
    """A drop folder where one shard of new stories has arrived (written once: a demo run
    again finds no new data)."""
    drop = lmforge_home() / "drop"
    shard = drop / "night-1.jsonl"
    if not shard.is_file():
        drop.mkdir(parents=True, exist_ok=True)
        rng = random.Random(2026)
        shard.write_text("".join(json.dumps({"text": story(rng)}) + "\n"
                                 for _ in range(documents)))
    return drop


if __name__ == "__main__":
    main()
