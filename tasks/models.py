"""The MLflow model registry, by reference: a registered version points at the artifact folder
on the shared filesystem (no gigabytes copied into an artifact store), and `models:/NAME/VERSION`,
`models:/NAME/latest` or `models:/NAME@ALIAS` resolves back to that folder, so a flow can start
from "the latest model". A flow records the version such a URI named when it started (`pin`), not
`latest`: a run says which model it used.

A version is linked to the artifact's logged model (tasks/logged_models.py), says in its
description what it is, what it was trained on and from which base, carries its lineage as tags
(`lmforge.path`, `.fingerprint`, `.data_fingerprint`, `.base_model`, `.train_run`) and, once
evaluated, the evaluation's figures as tags `eval.<metric>`. Aliases: `latest-<flow>` on every
registration, plus those the flow is given (the nightly deployment moves `nightly`).

A local store (SQLite) takes the folder's `file://` URI as the version's source. An MLflow server
refuses local sources outside a run's or logged model's artifact folder; there the source is the
logged model's (empty) artifact folder. Either way the tag `lmforge.path` holds the folder.
Only folders inside LMFORGE_HOME are registered: the registry is shared, and an entry is a promise
that lmforge keeps the folder (a resolved `models:/` URI is an input, read wherever it lies).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from engine.data.samples import parse_blend
from engine.manifest import read_manifest
from tasks.artifact import ArtifactRef
from tasks.headline import is_number
from tasks.home import inside_home
from tasks.logged_models import find, link_version
from tasks.run_inputs import dataset_name
from tasks.tracking import client, metric_name

SCHEME = "models:/"
PATH_TAG = "lmforge.path"


@task(name="register-model", task_run_name="register {name}", cache_policy=NO_CACHE)
async def register_model(ref: ArtifactRef, name: str, trained: ArtifactRef | None = None,
                         base: str | None = None, aliases: list[str] | None = None,
                         lineage: dict[str, str] | None = None) -> int:
    """Register `ref` (trained as `trained`, from `base`: a pinned URI or a folder) as a version
    of model `name`, once per fingerprint, with `lineage` as more `lmforge.` tags (a teacher,
    the data shards); point `latest-<flow>` and `aliases` at it. Returns the version."""
    version = await asyncio.to_thread(_register, ref, name, trained, base, lineage)
    moved = [f"latest-{flow_run.get_flow_name() or 'stage'}", *(aliases or [])]
    for alias in moved:
        await asyncio.to_thread(client().set_registered_model_alias, name, alias, str(version))
    get_run_logger().info("registered %s as %s%s/%d (%s)", ref.path, SCHEME, name, version,
                          ", ".join(f"@{a}" for a in moved))
    return version


@task(name="record-evaluation", cache_policy=NO_CACHE)
async def record_evaluation(report: ArtifactRef) -> None:
    """The evaluation's figures as tags `eval.<metric>` of every registered version of the model
    it evaluated (the registry's version page shows tags), and `lmforge.eval_run`."""
    await asyncio.to_thread(_record_evaluation, report)


def _register(ref: ArtifactRef, name: str, trained: ArtifactRef | None = None,
              base: str | None = None, lineage: dict[str, str] | None = None) -> int:
    inside_home(ref.path, f"registered model {name!r}: source")
    mlflow = client()
    try:
        mlflow.create_registered_model(name, description="lmforge models (sources are folders on "
                                       "the shared filesystem: see the lmforge.path tag)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for version in mlflow.search_model_versions(f"name = '{name}'"):
        if version.tags.get("lmforge.fingerprint") == ref.fingerprint:
            return int(version.version)
    model = find(mlflow, ref.fingerprint)
    data = _training_data(trained)
    tags = {PATH_TAG: ref.path, "lmforge.fingerprint": ref.fingerprint, "lmforge.kind": ref.kind,
            "lmforge.data_fingerprint": ",".join(fp for _, fp in data),
            "lmforge.base_model": base, "lmforge.train_run": trained and trained.mlflow_run_id,
            **{f"lmforge.{key}": value for key, value in (lineage or {}).items()}}
    tags = {k: v for k, v in tags.items() if v}
    description = _description(ref, trained, data, base)
    model_id = model.model_id if model else None
    try:
        created = mlflow.create_model_version(name, Path(ref.path).as_uri(), ref.mlflow_run_id,
                                              tags=tags, description=description, model_id=model_id)
    except MlflowException as exc:
        if exc.error_code != "INVALID_PARAMETER_VALUE" or model is None:
            raise
        created = mlflow.create_model_version(name, model.artifact_location, ref.mlflow_run_id,
                                              tags=tags, description=description, model_id=model_id)
    if model_id:
        link_version(mlflow, model_id, name, created.version)
    return int(created.version)


def _training_data(trained: ArtifactRef | None) -> list[tuple[str, str]]:
    """(dataset name, fingerprint) of what `trained` was trained on, from its manifest."""
    manifest = read_manifest(trained.path) if trained else None
    if manifest is None:
        return []
    blend = parse_blend(manifest.spec["data"]["blend"])
    return [(dataset_name(prefix), manifest.inputs.get(f"data[{i}]", ""))
            for i, (_, prefix) in enumerate(blend)]


def _description(ref: ArtifactRef, trained: ArtifactRef | None, data: list[tuple[str, str]],
                 base: str | None) -> str:
    what = f"{ref.kind} at {ref.path} (fingerprint {ref.fingerprint[:16]})"
    if trained is None:
        return f"{what}."
    figures = trained.summary
    on = ", ".join(f"{name} (fingerprint {fp[:16]})" for name, fp in data) or "its dataset"
    how = (f"{trained.stage}: {figures.get('iterations')} iterations, {figures.get('tokens')} "
           f"tokens, final loss {figures.get('loss')}")
    return f"{what}. {how}, on {on}; from {base or 'scratch'}."


def _record_evaluation(report: ArtifactRef) -> None:
    manifest = read_manifest(report.path)
    model = manifest.inputs.get("model") if manifest else None
    if model is None:
        return
    mlflow = client()
    for version in mlflow.search_model_versions(f"tags.`lmforge.fingerprint` = '{model}'"):
        tags = {f"eval.{metric_name(k)}": str(v)
                for k, v in report.summary.get("metrics", {}).items() if is_number(v)}
        for key, value in {**tags, "lmforge.eval_run": report.mlflow_run_id or ""}.items():
            mlflow.set_model_version_tag(version.name, version.version, key, value)


class NotRegistered(ValueError):
    """A registry URI that names no version: no such model, version or alias."""


def _version(uri: str) -> ModelVersion:
    """The version `models:/NAME/VERSION`, `models:/NAME/latest` or `models:/NAME@ALIAS` names."""
    name, _, version = uri.removeprefix(SCHEME).partition("/")
    mlflow = client()
    try:
        if "@" in name and not version:
            return mlflow.get_model_version_by_alias(*name.split("@", 1))
        if version in ("", "latest"):
            versions = mlflow.search_model_versions(f"name = '{name}'")
            if not versions:
                raise NotRegistered(f"{uri}: model {name!r} has no registered version")
            return max(versions, key=lambda v: int(v.version))
        return mlflow.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise NotRegistered(f"{uri}: not in the MLflow registry ({exc.message})") from None


def pin(uri: str | None) -> str | None:
    """`models:/NAME/latest` or `models:/NAME@ALIAS` -> the `models:/NAME/VERSION` it names now;
    anything else as given."""
    if uri is None or not uri.startswith(SCHEME):
        return uri
    found = _version(uri)
    return f"{SCHEME}{found.name}/{found.version}"


def resolve_model(uri: str) -> str:
    """A registry URI -> the model's folder; other paths as given."""
    if not uri.startswith(SCHEME):
        return uri
    found = _version(uri)
    return found.tags.get(PATH_TAG) or found.source.removeprefix("file://")
