"""The evaluate flow: one model (an HF folder, a native checkpoint, or a registered model),
evaluated on the suites whose data is given, or on held-out generated stories."""

from __future__ import annotations

from prefect import flow

from flows.params import EvalParams, RunParams
from flows.runner import Runner
from flows.steps import Refs, evaluate_model, given_model
from tasks.models import pin
from tasks.run_tags import tag_flow_run
from tasks.summary import publish_summary
from tasks.tracking import tracked_flow


@flow(name="evaluate")
async def evaluate(model: str, tokenizer: str | None = None,
                   evaluation: EvalParams = EvalParams(), run: RunParams = RunParams()) -> Refs:
    """Returns references to the report (`evaluate`) and any held-out data it generated.

    Args:
        model: an HF folder, a native checkpoint, or models:/NAME/VERSION|latest|@ALIAS.
        tokenizer: default: the model's own.
        evaluation: suites and their data; without ppl data, held-out generated stories.
        run: cluster profile, per-stage resources, forced rebuilds.
    """
    await tag_flow_run(run.profile)
    model = pin(model)  # `latest` now: the run records, and uses, that version
    target = given_model(model)
    await evaluate_model(Runner(run, dry=True), evaluation, target, tokenizer, {})
    refs: Refs = {}
    with tracked_flow({"model": model, "tokenizer": tokenizer, "evaluation": evaluation,
                       "run": run}, refs):
        await evaluate_model(Runner(run), evaluation, target, tokenizer, refs)
        await publish_summary(refs)
        return refs
