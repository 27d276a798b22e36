"""The MLflow model registry, by reference: a registered version points at the artifact folder
on the shared filesystem (no gigabytes copied into an artifact store), and `models:/NAME/VERSION`
or `models:/NAME/latest` resolves back to that folder, so a flow can start from "the latest model".

A local store (SQLite) takes the folder's `file://` URI as the version's source. An MLflow server
refuses local sources outside a run's artifact folder; there the version's source is a small
`reference/` artifact of the run that names the folder. Either way the tag `lmforge.path` holds it.
Only folders inside LMFORGE_HOME are registered: the registry is shared, and an entry is a promise
that lmforge keeps the folder (a resolved `models:/` URI is an input, read wherever it lies).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.artifact import ArtifactRef
from tasks.home import inside_home
from tasks.tracking import client

SCHEME = "models:/"
PATH_TAG = "lmforge.path"


@task(name="register-model", task_run_name="register {name}", cache_policy=NO_CACHE)
async def register_model(ref: ArtifactRef, name: str) -> int:
    """Register `ref` as a version of model `name` (once per fingerprint); returns the version."""
    version = await asyncio.to_thread(_register, ref, name)
    get_run_logger().info("registered %s as %s%s/%d", ref.path, SCHEME, name, version)
    return version


def _register(ref: ArtifactRef, name: str) -> int:
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
    tags = {PATH_TAG: ref.path, "lmforge.fingerprint": ref.fingerprint, "lmforge.kind": ref.kind}
    try:
        created = mlflow.create_model_version(name, Path(ref.path).as_uri(), ref.mlflow_run_id,
                                              tags=tags)
    except MlflowException as exc:
        if exc.error_code != "INVALID_PARAMETER_VALUE" or ref.mlflow_run_id is None:
            raise
        created = mlflow.create_model_version(name, _reference(ref), ref.mlflow_run_id, tags=tags)
    return int(created.version)


def _reference(ref: ArtifactRef) -> str:
    """A `reference/` artifact in the run naming the folder; its URI as the version's source."""
    mlflow = client()
    with tempfile.TemporaryDirectory() as tmp:
        note = Path(tmp) / "lmforge-model.json"
        note.write_text(json.dumps({"path": ref.path, "fingerprint": ref.fingerprint}))
        mlflow.log_artifact(ref.mlflow_run_id, str(note), "reference")
    return f"{mlflow.get_run(ref.mlflow_run_id).info.artifact_uri}/reference"


def resolve_model(uri: str) -> str:
    """`models:/NAME/VERSION` or `models:/NAME/latest` -> the model's folder; other paths as given."""
    if not uri.startswith(SCHEME):
        return uri
    name, _, version = uri.removeprefix(SCHEME).partition("/")
    mlflow = client()
    if version in ("", "latest"):
        versions = mlflow.search_model_versions(f"name = '{name}'")
        if not versions:
            raise ValueError(f"{uri}: model {name!r} has no registered version")
        found = max(versions, key=lambda v: int(v.version))
    else:
        found = mlflow.get_model_version(name, version)
    return found.tags.get(PATH_TAG) or found.source.removeprefix("file://")
