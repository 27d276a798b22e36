"""The plan flow: the planner's ranked layouts for a model on a cluster (engine/plan/,
docs/planner.md), published in Prefect and MLflow (tasks/plan.py). Pure computation: no job."""

from __future__ import annotations

from typing import Any

from prefect import flow

from engine.plan.spec import Spec
from tasks.plan import publish_plan
from tasks.tracking import tracked_flow


@flow(name="plan")
async def plan(options: Spec) -> dict[str, Any]:
    """Returns the recommended layout's record (empty when no layout fits).

    Args:
        options: the model (architecture, or load: an HF folder, checkpoint or
            models:/NAME/VERSION), sequence, batch, precision, GPUs, token budget, and the
            layout fields to hold fixed (the others are searched).
    """
    with tracked_flow({"options": options}) as parent:
        return await publish_plan(options, parent)
