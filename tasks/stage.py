"""One Prefect task for every engine stage: validate the typed spec, run the stage, return its
manifest. (Submission through cluster/ executors, caching by fingerprint and MLflow tracking are
added on top of this task; the stage's work itself always lives in engine/.)"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from engine.registry import get_stage


@task(task_run_name="{stage}")
def run_stage(stage: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run `stage` with `spec` and return its manifest as a dict."""
    log = get_run_logger()
    entry = get_stage(stage)
    validated = entry.spec.model_validate(spec)
    log.info("running %s", stage)
    manifest = entry.run(validated)
    log.info("%s done: %s", stage, {k: v for k, v in manifest.summary.items()
                                    if isinstance(v, (int, float, str))})
    return manifest.model_dump(mode="json")
