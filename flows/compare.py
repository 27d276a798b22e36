"""The compare flow: several models evaluated on the same suites and shown side by side — one
Markdown table (a Prefect artifact, and in the flow's MLflow run), a bar chart per metric (an
MLflow figure) and each model's figures as the run's metrics (tasks/comparison.py). Each model's
evaluation is the evaluate flow's own step, so it is cached alike."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.params import EvalParams, RunParams
from flows.runner import Runner
from flows.steps import Refs, evaluate_model, given_model
from tasks.comparison import publish_comparison
from tasks.models import SCHEME, pin
from tasks.run_tags import tag_flow_run
from tasks.summary import publish_summary
from tasks.tracking import tracked_flow


@flow(name="compare")
async def compare(models: list[str], tokenizer: str | None = None,
                  evaluation: EvalParams = EvalParams(), run: RunParams = RunParams()) -> str:
    """Returns the comparison table (Markdown).

    Args:
        models: HF folders, native checkpoints, or models:/NAME/VERSION|latest|@ALIAS, two
            or more.
        tokenizer: default: each model's own.
        evaluation: suites and their data, the same for every model.
        run: cluster profile, per-stage resources, forced rebuilds.
    """
    if len(models) < 2:
        raise ValueError("compare needs at least two models")
    await tag_flow_run(run.profile)
    models = [pin(m) for m in models]  # `latest` now: the run records, and uses, that version
    targets = [given_model(m) for m in models]
    labels = [m.removeprefix(SCHEME) if m.startswith(SCHEME) else Path(m.rstrip("/")).name or m
              for m in models]
    labels = labels if len(set(labels)) == len(labels) else models
    for target in targets:  # every spec checked before the first job
        await evaluate_model(Runner(run, dry=True), evaluation, target, tokenizer, {})
    with tracked_flow({"models": models, "tokenizer": tokenizer, "evaluation": evaluation,
                       "run": run}) as parent:
        reports, refs = [], {}
        for label, target in zip(labels, targets):
            found: Refs = {}
            ref = await evaluate_model(Runner(run), evaluation, target, tokenizer, found)
            reports.append(Path(ref.path))
            refs |= {f"{step}: {label}": each for step, each in found.items()}
        table = await publish_comparison(parent, labels, reports, "model-comparison",
                                         f"{len(models)} models side by side")
        await publish_summary(refs, details=table)
        return table
