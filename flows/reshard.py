"""The reshard flow: a native checkpoint rewritten for another training layout (the stage's ranks
come from the run's resources for `reshard`), with or without its optimizer state, or
consolidated into one safetensors file; a training run then resumes from it in that layout."""

from __future__ import annotations

from prefect import flow

from flows.params import ReshardOptions, RunParams
from flows.runner import Runner
from flows.steps import Refs, reshard_checkpoint
from tasks.run_tags import tag_flow_run
from tasks.summary import publish_summary
from tasks.tracking import tracked_flow


@flow(name="reshard")
async def reshard(checkpoint: str, options: ReshardOptions = ReshardOptions(),
                  run: RunParams = RunParams()) -> Refs:
    """Returns a reference to the resharded checkpoint (`reshard`).

    Args:
        checkpoint: a native checkpoint folder (its latest complete iteration) or an iter_* folder.
        options: the target layout (tensor_parallel, pipeline_parallel, data_parallel,
            data_parallel_replicate; the rest of the ranks data parallel), optimizer state kept
            or not, consolidate into one file.
        run: cluster profile, per-stage resources (`reshard`: the ranks of the new layout, e.g.
            {"reshard": {"gpus_per_node": 8}}), forced rebuilds.
    """
    await tag_flow_run(run.profile)
    await reshard_checkpoint(Runner(run, dry=True), options, checkpoint, {})
    refs: Refs = {}
    with tracked_flow({"checkpoint": checkpoint, "options": options, "run": run}, refs):
        await reshard_checkpoint(Runner(run), options, checkpoint, refs)
        await publish_summary(refs)
        return refs
