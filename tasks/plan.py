"""The planner (engine/plan/) in flows: a plan published (Prefect Markdown artifact `plan`; the
flow's MLflow run: the recommended layout as params, its memory and speed as metrics, the table
and the ranked layouts as files), and the layout of a training stage chosen by it (`run.layout:
recommend`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from mlflow.entities import Metric, Param
from prefect import task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE

from cluster.profiles import load_profile
from cluster.resources import Resources
from engine.errors import SpecError
from engine.plan.check import gpu_named, spec_model
from engine.plan.command import plan, report, title
from engine.plan.estimate import LAYOUT_FIELDS, estimate
from engine.plan.memory import GIB, rank_memory
from engine.plan.report import record
from engine.plan.search import alternatives
from engine.plan.spec import Spec
from engine.train.spec import TrainSpec
from tasks.models import resolve_model
from tasks.options import validate_spec
from tasks.tracking import client


@task(name="plan", cache_policy=NO_CACHE)
async def publish_plan(spec: Spec, parent: str | None) -> dict[str, Any]:
    """The ranked layouts of `spec` (its `load` may be a registry URI); the recommended one's
    record (None when nothing fits)."""
    if spec.load:
        spec = spec.model_copy(update={"load": resolve_model(spec.load)})
    model, estimates = await asyncio.to_thread(plan, spec)
    table = report(spec, model, estimates)
    await acreate_markdown_artifact(markdown=table, key="plan",
                                    description=title(spec, model))
    best = next((record(e, spec.tokens) for e in estimates if e.fits), None)
    if parent is not None:
        await asyncio.to_thread(_track, parent, table, [record(e, spec.tokens) for e in estimates],
                                best)
    return best or {}


def _track(parent: str, table: str, records: list[dict], best: dict | None) -> None:
    mlflow = client()
    mlflow.log_text(parent, table, "plan.md")
    mlflow.log_text(parent, json.dumps(records, indent=1), "plan.json")
    if best is None:
        return
    mlflow.log_batch(parent, params=[Param(f"recommended.{k}", str(best[k]))
                                     for k in (*LAYOUT_FIELDS, "layout")], metrics=[
        *(Metric(f"plan/memory_gib/{k}", v, 0, 0) for k, v in best["memory_gib"].items()),
        *(Metric(f"plan/{k}", best[k], 0, 0) for k in ("step_s", "tokens_per_s", "mfu")),
        *([Metric("plan/days", best["days"], 0, 0)] if "days" in best else [])])


def recommended_layout(stage: str, spec: dict[str, Any], resources: Resources | dict | None,
                       profile: str | None) -> dict[str, Any]:
    """`spec` with the layout fields of the planner's fastest layout that fits the GPUs of the
    profile's resources (`gpu` must be named); other stages unchanged."""
    checked = validate_spec(stage, spec)
    if not isinstance(checked, TrainSpec):
        return spec
    res = load_profile(profile).resources.override(resources)
    if not res.gpu:
        raise SpecError(f"{stage}: layout 'recommend' needs the GPU model (resources.gpu in the "
                        "profile or the run's resources)")
    cfg = spec_model(checked)
    if cfg is None:
        raise SpecError(f"{stage}: layout 'recommend' needs the model's architecture (model, or "
                        f"a readable checkpoint in load)")
    given = {"precision": spec["precision"]} if "precision" in spec else {}
    estimates = alternatives(checked, cfg, res.world_size, gpu_named(res.gpu),
                             res.ranks_per_node, given)
    best = next((e for e in estimates if e.fits), None)
    if best is None:
        raise SpecError(f"{stage}: no layout on {res.world_size} × {res.gpu} fits")
    return {**spec, **best.fields, "pipeline_layers": None}


def log_prediction(run_id: str, spec, resources: Resources) -> None:
    """A training stage's predicted memory and speed in its MLflow run, beside what the run
    measures (`held_bytes.*` of rank 0, `peak_memory_gib`, `tokens_per_s`): `plan.<category>`
    for rank 0 in bytes, `plan.peak_gib` of the most loaded GPU, `plan.tokens_per_s`. Only when
    the resources name the GPU model."""
    cfg = spec_model(spec) if resources.gpu and isinstance(spec, TrainSpec) else None
    if cfg is None:
        return
    found = estimate(cfg, spec, resources.world_size, gpu_named(resources.gpu),
                     resources.ranks_per_node)
    first = rank_memory(cfg, spec, found.layout, 0).as_dict()
    metrics = [Metric(f"plan.{k}", float(v), 0, 0) for k, v in first.items()]
    metrics += [Metric("plan.peak_gib", found.memory.total / GIB, 0, 0),
                Metric("plan.tokens_per_s", found.tokens_per_s, 0, 0)]
    client().log_batch(run_id, metrics=metrics)
