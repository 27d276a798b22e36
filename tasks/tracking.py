"""MLflow layout: one experiment per flow, a parent run per flow run, one nested run per stage.

The store is `MLFLOW_TRACKING_URI` when set (a server), else SQLite under LMFORGE_HOME
(`sqlite:///<home>/mlflow.db`, artifacts in `<home>/mlartifacts/<experiment>/`). A stage's run
holds its spec as params, the engine's step metrics (logged live by the job, completed from the
JSON lines afterwards), its summary figures, and as artifacts the spec, the manifest, the small
descriptive files of the artifact (evaluation reports, configs; its `tables/*.json` also as MLflow
tables: a synthesized corpus's sample completions), the metrics file and a loss curve;
what it read as dataset and model inputs (tasks/run_inputs.py), and the model it built or
evaluated as a logged model with its figures (tasks/logged_models.py). Experiments are MLflow 3
model-training experiments (`mlflow.experimentKind`).
Runs are found again through tags: `prefect.flow_run_id` on parents, `lmforge.fingerprint` and
`lmforge.cached` on stage runs. Everything shown there — params, tags, the spec and manifest
artifacts, links — goes through engine/redact.py: secret-named fields and URL passwords masked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect.runtime import flow_run, task_run
from prefect.settings import PREFECT_UI_URL
from pydantic_core import to_jsonable_python

from engine.manifest import Manifest
from engine.metrics import flatten
from engine.redact import redact, redact_text
from engine.registry import get_stage
from tasks.headline import headline, headline_settings, is_number
from tasks import logged_models
from tasks.home import inside_home, lmforge_home
from tasks.logged_models import MODEL_KINDS
from tasks.metrics import backfill, step_series
from tasks.plots import loss_curve
from tasks.run_inputs import Inputs, log_inputs

TRACKING_ENV = "MLFLOW_TRACKING_URI"
UI_ENV = "LMFORGE_MLFLOW_UI"          # base URL of the MLflow UI used in links
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default
STANDALONE = "lmforge-stages"         # experiment of stages run outside any flow
FLOW_RUN_TAG = "prefect.flow_run_id"
# MLflow 3's UI opens an experiment by this tag: without it, an experiment whose runs it has not
# looked at yet opens on the GenAI side (an empty Traces page); "custom_model_development" is
# its model-training view, where the runs table with its nested stage runs is
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
TABLES = "tables"  # an artifact's folder of tables as columns ({"column": [values]}), JSON
DESCRIPTIVE = (".json", ".md", ".yaml", ".txt")  # artifact files copied into the run ...
DESCRIPTIVE_MAX_BYTES = 1 << 20                   # ... when this small
PARAM_BATCH, PARAM_MAX, TAG_MAX = 100, 6000, 5000
# the job's MLflow client: one try per call, at most a few seconds (see StageRun.job_env)
JOB_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def tracking_uri() -> str:
    return os.environ.get(TRACKING_ENV) or f"sqlite:///{lmforge_home() / 'mlflow.db'}"


def ui_url() -> str:
    """For links people see (Prefect artifacts): a tracking URI's password masked."""
    uri = tracking_uri()
    default = uri if uri.startswith(("http://", "https://")) else DEFAULT_UI
    return redact_text(os.environ.get(UI_ENV, default).rstrip("/"))


@cache
def _client(uri: str) -> MlflowClient:
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def client() -> MlflowClient:
    return _client(tracking_uri())


def experiment_id(name: str) -> str:
    """The experiment called `name`, a model-training experiment, created on first use
    (artifacts under LMFORGE_HOME for a local store, refused if the name leads out of it; a
    server keeps its own artifact root). One that an older lmforge made without the kind gets it."""
    mlflow = client()
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        if KIND_TAG not in found.tags:
            mlflow.set_experiment_tag(found.experiment_id, KIND_TAG, MODEL_TRAINING)
        return found.experiment_id
    local = not tracking_uri().startswith(("http://", "https://"))
    location = (inside_home(lmforge_home() / "mlartifacts" / name,
                            f"MLflow artifact location of experiment {name!r}").as_uri()
                if local else None)
    try:
        return mlflow.create_experiment(name, artifact_location=location,
                                        tags={KIND_TAG: MODEL_TRAINING})
    except MlflowException:  # created meanwhile by another process
        return mlflow.get_experiment_by_name(name).experiment_id


def run_link(experiment: str, run_id: str) -> str:
    return f"{ui_url()}/#/experiments/{experiment}/runs/{run_id}"


def artifact_url(run_id: str, path: str) -> str:
    """Where the MLflow server (or `mlflow ui`) serves a file of a run's artifacts."""
    return f"{ui_url()}/get-artifact?{urlencode({'path': path, 'run_uuid': run_id})}"


def params(spec: dict[str, Any]) -> list[Param]:
    """A spec as MLflow params: redacted, nested sections flattened with dots and values as
    strings, as the engine's own sink logs them (so the two never disagree on a value)."""
    return [Param(k, str(v)[:PARAM_MAX]) for k, v in flatten(redact(spec)).items()]


def metric_name(name: str) -> str:
    return re.sub(r"[^/\w.\- :]", "_", name).strip("/") or "_"


# ------------------------------------------------------------------ flow runs
_parents: dict[str, tuple[str, str]] = {}


def flow_parent() -> tuple[str, str | None]:
    """(experiment id, parent run id) for the Prefect flow run we are in, the parent created on
    first use; outside a flow: the standalone experiment and no parent."""
    run_id = flow_run.get_id()
    if run_id is None:
        return experiment_id(STANDALONE), None
    if run_id not in _parents:
        experiment = experiment_id(flow_run.get_flow_name())
        found = client().search_runs([experiment], f"tags.`{FLOW_RUN_TAG}` = '{run_id}'",
                                     max_results=1)
        if found:
            parent = found[0].info.run_id
        else:
            tags = {FLOW_RUN_TAG: run_id, "prefect.flow_run_name": flow_run.get_name() or ""}
            if PREFECT_UI_URL.value():  # none for Prefect's temporary server: no link to a UI
                tags["prefect.flow_run_url"] = flow_run.get_flow_run_ui_url()
            parent = client().create_run(experiment, run_name=flow_run.get_name(),
                                         tags=redact(tags)).info.run_id
        _parents[run_id] = (experiment, parent)
    return _parents[run_id]


@contextlib.contextmanager
def tracked_flow(flow_params: dict[str, Any],
                 refs: dict[str, Any] | None = None) -> Iterator[str | None]:
    """The flow run's parent MLflow run, with the flow's parameters (pydantic models welcome);
    it ends FINISHED with the headline figures of the artifacts the flow put in `refs`
    (tasks/headline.py) as metrics and the trained model's size as params, or FAILED when the
    flow raises (KILLED when cancelled)."""
    _, parent = flow_parent()
    mlflow = client()
    _log_params(mlflow, parent, params(to_jsonable_python(flow_params)))
    try:
        yield parent
    except BaseException as exc:
        mlflow.set_terminated(parent, "FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    now = int(time.time() * 1000)
    figures = [Metric(metric_name(k), v, now, 0) for k, v in headline(refs or {}).items()]
    mlflow.log_batch(parent, metrics=figures)
    _log_params(mlflow, parent, [Param(k, v) for k, v in headline_settings(refs or {}).items()])
    mlflow.set_terminated(parent, "FINISHED")


def _log_params(mlflow: MlflowClient, run_id: str, items: list[Param]) -> None:
    for i in range(0, len(items), PARAM_BATCH):
        mlflow.log_batch(run_id, params=items[i:i + PARAM_BATCH])


# ------------------------------------------------------------------ stage runs
def stage_label(stage: str) -> str:
    """What ran on what, as the flow labels its stage task ("tokenize stories-000.jsonl",
    "held-out corpus"), else the stage's name: the Prefect task run and the MLflow run alike."""
    return task_run.get_parameters().get("label") or stage


@dataclass
class StageRun:
    experiment: str
    run_id: str

    @classmethod
    def start(cls, stage: str, fingerprint: str, inputs: Inputs, location: str,
              spec: dict[str, Any], cached: bool) -> "StageRun":
        """A stage's run, with what it reads as dataset and model inputs (tasks/run_inputs.py)."""
        experiment, parent = flow_parent()
        tags = {"lmforge.stage": stage, "lmforge.fingerprint": fingerprint,
                "lmforge.artifact": location, "lmforge.cached": str(cached).lower(),
                "prefect.task_run_id": str(task_run.get_id() or "")}
        if parent:
            tags["mlflow.parentRunId"] = parent
        name = f"{stage_label(stage)} (cached)" if cached else stage_label(stage)
        run = cls(experiment, client().create_run(experiment, run_name=name,
                                                  tags=redact(tags)).info.run_id)
        if not cached:
            _log_params(client(), run.run_id, params(spec))
        log_inputs(client(), run.run_id, stage, inputs)
        return run

    @property
    def link(self) -> str:
        return run_link(self.experiment, self.run_id)

    def job_env(self) -> dict[str, str]:
        """What the job needs to log into this run itself (engine/metrics.py). Its client fails
        fast: MLflow's default retries (meant for rate limits) hold each call for minutes while
        the server is down, and the training step with it; what a failed call loses, the task
        backfills from the JSON lines."""
        return {TRACKING_ENV: tracking_uri(), "MLFLOW_RUN_ID": self.run_id,
                "MLFLOW_EXPERIMENT_ID": self.experiment, **JOB_CLIENT_ENV}

    def tag(self, **tags: Any) -> None:
        # redacted before cut: a cut could leave a URL's password without the `@` that marks it
        shown = redact({f"lmforge.{k}": str(v) for k, v in tags.items()})
        client().log_batch(self.run_id, tags=[RunTag(k, v[:TAG_MAX]) for k, v in shown.items()])

    def cached(self, fingerprint: str) -> None:
        """A cache hit: link the run that built the artifact, and end at once."""
        built_by = _builder(fingerprint)
        if built_by:
            self.tag(built_by=built_by)
        client().set_terminated(self.run_id, "FINISHED")

    def followed(self) -> None:
        """Another flow run follows the job of this run, whose own flow run ended with it still
        running: the run is running again."""
        mlflow = client()
        if "lmforge.error" in mlflow.get_run(self.run_id).data.tags:
            mlflow.delete_tag(self.run_id, "lmforge.error")
        mlflow.update_run(self.run_id, status="RUNNING")
        self.tag(followed_by=flow_run.get_id() or "")

    def failed(self, error: BaseException, job_log: Path | None) -> None:
        self.tag(error=error)
        if job_log is not None and job_log.is_file():
            client().log_artifact(self.run_id, str(job_log), "job")
        killed = not isinstance(error, Exception)  # cancelled (CancelledError, KeyboardInterrupt)
        client().set_terminated(self.run_id, "KILLED" if killed else "FAILED")

    def finished(self, stage: str, spec: dict[str, Any], manifest: Manifest, location: str,
                 metrics_file: Path | None, job_log: Path | None) -> None:
        mlflow = client()
        series = step_series(metrics_file) if metrics_file and metrics_file.is_file() else {}
        backfill(mlflow, self.run_id, series)
        last_step = max((s for points in series.values() for s in points), default=0)
        now = int(time.time() * 1000)
        summary = flatten(manifest.summary)
        settings = get_stage(stage).settings
        described = {k: v for k, v in summary.items() if k.split(".")[0] in settings}
        measured = {metric_name(k): float(v) for k, v in summary.items()
                    if is_number(v) and k not in described}
        model_id = self._model(manifest, location, described, last_step)
        figures = [Metric(k, v, now, last_step, model_id=model_id)
                   for k, v in measured.items() if k not in series]
        if model_id:  # the final losses too: the model's page shows what it was left at
            figures += logged_models.last_points(mlflow, self.run_id, model_id,
                                                 [k for k in measured if k in series])
        mlflow.log_batch(self.run_id, metrics=figures[:1000])
        _log_params(mlflow, self.run_id, [Param(f"artifact.{k}", str(v)[:PARAM_MAX])
                                          for k, v in sorted(described.items())])
        mlflow.log_dict(self.run_id, redact(spec), "spec.json")
        mlflow.log_dict(self.run_id, redact(manifest.model_dump(mode="json")), "manifest.json")
        for path in _descriptive_files(manifest, location):
            mlflow.log_artifact(self.run_id, str(path), "artifact")
            if path.parent.name == TABLES:  # the UI's table view (sample completions); at the
                # top level: mlflow.load_table cannot find a table whose name holds a "/"
                mlflow.log_table(self.run_id, json.loads(path.read_text(encoding="utf-8")),
                                 path.name)
        if metrics_file and metrics_file.is_file():
            mlflow.log_artifact(self.run_id, str(metrics_file), "metrics")
        if job_log is not None and job_log.is_file():
            mlflow.log_artifact(self.run_id, str(job_log), "job")
        figure = loss_curve(series, f"{stage} {manifest.fingerprint[:12]}")
        if figure is not None:
            mlflow.log_figure(self.run_id, figure, "plots/loss.png")
        mlflow.set_terminated(self.run_id, "FINISHED")

    def _model(self, manifest: Manifest, location: str, described: dict[str, Any],
               step: int) -> str | None:
        """The logged model the run's figures are about: the checkpoint or HF export it built
        (recorded now, tasks/logged_models.py), or the model it evaluated; else None."""
        if manifest.kind in MODEL_KINDS:
            return logged_models.record(client(), self.experiment, self.run_id, manifest,
                                        location, described, step)
        evaluated = manifest.inputs.get("model") if manifest.kind == "eval-report" else None
        found = logged_models.find(client(), evaluated) if evaluated else None
        return found.model_id if found else None


def _descriptive_files(manifest: Manifest, location: str) -> list[Path]:
    """Small text files the artifact lists (reports, configs), not its data."""
    base = Path(location)
    base = base if base.is_dir() else base.parent
    return [base / name for name, entry in sorted(manifest.files.items())
            if name.endswith(DESCRIPTIVE) and entry.bytes <= DESCRIPTIVE_MAX_BYTES
            and (base / name).is_file()]


def _builder(fingerprint: str) -> str | None:
    """The finished, non-cached run that built the artifact with this fingerprint, if any."""
    mlflow = client()
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    found = mlflow.search_runs(
        experiments, f"tags.`lmforge.fingerprint` = '{fingerprint}' and "
        f"tags.`lmforge.cached` = 'false' and attributes.status = 'FINISHED'", max_results=1)
    return found[0].info.run_id if found else None
