"""The data_prep flow: text to one training-ready Megatron dataset (corpus -> tokenizer ->
tokenize each shard -> merge), the lifecycle's first steps on their own."""

from __future__ import annotations

from prefect import flow

from flows.params import DataParams, RunParams
from flows.runner import Runner
from flows.steps import Refs, prepare_data
from tasks.run_tags import tag_flow_run
from tasks.summary import publish_summary
from tasks.tracking import tracked_flow


@flow(name="data_prep")
async def data_prep(data: DataParams = DataParams(), run: RunParams = RunParams()) -> Refs:
    """Returns a reference to every artifact; `merge` is the dataset.

    Args:
        data: the corpus and tokenizer (given, or made) and the tokenization settings.
        run: cluster profile, per-stage resources, forced rebuilds.
    """
    await tag_flow_run(run.profile)
    await prepare_data(Runner(run, dry=True), data, {})
    with tracked_flow({"data": data, "run": run}):
        refs: Refs = {}
        await prepare_data(Runner(run), data, refs)
        await publish_summary(refs)
        return refs
