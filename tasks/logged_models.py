"""Checkpoints and HF exports as MLflow 3 logged models, by reference: the model records the run
that built it, its folder (tag `lmforge.path`), fingerprint and shape, and its figures (training
losses, the evaluations run on it), but no weights: its artifact folder in MLflow stays empty, so
gigabytes are never copied into the artifact store. A registered version points at it
(tasks/models.py); runs that start from it (finetune, convert, evaluate) list it as an input.

One logged model per artifact fingerprint, found again by the tag `lmforge.fingerprint` in any
experiment: an artifact built by one flow and evaluated by another is one model.
"""

from __future__ import annotations

import json
from typing import Any

from mlflow.entities import LoggedModel, LoggedModelOutput, Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from engine.manifest import Manifest

MODEL_KINDS = ("checkpoint", "hf-model")  # the artifact kinds that are models


def find(mlflow: MlflowClient, fingerprint: str) -> LoggedModel | None:
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    found = mlflow.search_logged_models(
        experiments, f"tags.`lmforge.fingerprint` = '{fingerprint}'", max_results=1)
    return found[0] if found else None


def record(mlflow: MlflowClient, experiment: str, run_id: str, manifest: Manifest,
           location: str, params: dict[str, Any], step: int) -> str:
    """The artifact's logged model, created with `run_id` as its source run unless one exists
    (a forced rebuild is the same model); either way an output of the run. Its id."""
    model = find(mlflow, manifest.fingerprint)
    if model is None:
        model = mlflow.create_logged_model(
            experiment, name=f"{manifest.stage}-{manifest.fingerprint[:12]}",
            source_run_id=run_id, model_type=manifest.kind,
            tags={"lmforge.path": location, "lmforge.fingerprint": manifest.fingerprint,
                  "lmforge.kind": manifest.kind, "lmforge.stage": manifest.stage},
            params={k: str(v)[:6000] for k, v in params.items()})
        mlflow.finalize_logged_model(model.model_id, "READY")
    mlflow.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    return model.model_id


def link_version(mlflow: MlflowClient, model_id: str, name: str, version: str) -> None:
    """The registered version listed on its logged model, as MLflow's UI reads it (tag
    `mlflow.modelVersions`). A server adds it when the version is created with the model's id;
    a local store leaves it to the client (MLflow's fluent `register_model` does the same)."""
    tags = mlflow.get_logged_model(model_id).tags
    listed = json.loads(tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if not any(e["name"] == name and str(e["version"]) == str(version) for e in listed):
        entry = {"name": name, "version": int(version)}  # as a server writes it
        mlflow.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed + [entry])})


def last_points(mlflow: MlflowClient, run_id: str, model_id: str, keys: list[str]) -> list[Metric]:
    """The last logged point of each of the run's metrics `keys`, about the model `model_id`.
    Logged again, identical but for the model, the run's history keeps it once (MLflow drops a
    point it has) while the model gains it."""
    points = []
    for key in keys:
        history = mlflow.get_metric_history(run_id, key)
        if history:
            last = max(history, key=lambda m: (m.step, m.timestamp))
            points.append(Metric(key, last.value, last.timestamp, last.step, model_id=model_id))
    return points

