"""The train flow: pretrain on a dataset, or finetune a base model on it, then export to HF and
register — what a nightly finetune runs."""

from __future__ import annotations

from prefect import flow

from flows.params import RunParams, TrainParams
from flows.runner import Runner
from flows.steps import Data, Refs, given_model, train_model
from tasks.models import pin
from tasks.run_tags import tag_flow_run
from tasks.summary import publish_summary
from tasks.tracking import tracked_flow


@flow(name="train")
async def train(dataset: str, tokenizer: str | None = None, base_model: str | None = None,
                training: TrainParams = TrainParams(), register_as: str | None = None,
                aliases: list[str] | None = None, run: RunParams = RunParams()) -> Refs:
    """Returns a reference to every artifact it made or found.

    Args:
        dataset: indexed dataset prefix (a merge or tokenize output, or any Megatron dataset).
        tokenizer: what the dataset was tokenized with; shipped with the HF export.
        base_model: finetune this model: an HF folder, a native checkpoint, or
            models:/NAME/VERSION|latest|@ALIAS (the MLflow registry). None: pretrain.
        training: the training options and the export to HF.
        register_as: MLflow registered model name for the HF export; None: not registered.
        aliases: registry aliases moved to the new version, besides `latest-train`.
        run: cluster profile, per-stage resources, forced rebuilds.
    """
    base_model = pin(base_model)  # `latest` now: the run records, and uses, that version

    async def steps(runner: Runner, refs: Refs) -> None:
        base = given_model(base_model)
        model = await train_model(runner, training, Data(dataset, tokenizer), base, refs)
        if model.hf:
            refs["convert"] = await runner.register(refs, register_as, base_model, aliases)

    await tag_flow_run(run.profile)
    await steps(Runner(run, dry=True), {})
    refs: Refs = {}
    with tracked_flow({"dataset": dataset, "tokenizer": tokenizer, "base_model": base_model,
                       "training": training, "register_as": register_as, "aliases": aliases,
                       "run": run}, refs):
        await steps(Runner(run), refs)
        await publish_summary(refs)
        return refs
