"""The metrics sink: how the engine reports params, step metrics and artifacts without knowing
about any tracking server. The default writes JSON lines into the run folder (a task can always
re-read them); when the job's environment names an MLflow run and mlflow is importable, rank 0
also logs there, and samples the node's CPU, memory and GPUs into it (`system_metrics`). Params
are redacted (engine/redact.py) before either sees them: a spec may name a URL with a password,
and these are logs."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

from engine.redact import redact, redact_text

log = logging.getLogger(__name__)


class MetricsSink:
    """JSON lines: {"kind": "params"|"metrics"|"artifact", "time", "step"?, "data"}."""

    def __init__(self, path: str | Path | None, enabled: bool = True) -> None:
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._mlflow = _mlflow_client() if enabled else None

    def _write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        shown = redact(params)
        self._write({"kind": "params", "time": time.time(), "data": shown})
        if self._mlflow:
            self._mlflow.log_params(shown)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._write({"kind": "metrics", "time": time.time(), "step": step, "data": clean})
        if self._mlflow:
            self._mlflow.log_metrics({k: v for k, v in clean.items() if math.isfinite(v)}, step)

    def log_artifact(self, path: str | Path) -> None:
        self._write({"kind": "artifact", "time": time.time(), "data": str(path)})
        if self._mlflow:
            self._mlflow.log_artifact(str(path))


class _MLflowRun:
    def __init__(self, client, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        flat = flatten(params)
        for k, v in flat.items():
            self._safe(self.client.log_param, self.run_id, k, str(v)[:6000])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self._safe(self.client.log_metric, self.run_id, k, v, step=step)

    def log_artifact(self, path: str) -> None:
        self._safe(self.client.log_artifact, self.run_id, path)

    @staticmethod
    def _safe(fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # tracking down must never stop training; JSON lines keep it all
            log.warning("MLflow logging failed (%s); the JSON-lines log has the data",
                        redact_text(str(exc)))  # errors quote the tracking URI


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: how params are named in MLflow, by the engine and tasks."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _job_run() -> str | None:
    """The MLflow run the job's environment names, for rank 0 only."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or not os.environ.get("MLFLOW_TRACKING_URI") or int(os.environ.get("RANK", "0")):
        return None
    return run_id


def _mlflow_client() -> _MLflowRun | None:
    run_id = _job_run()
    if run_id is None:
        return None
    try:  # optional: imported by name so the engine has no import-time dependency on mlflow
        tracking = importlib.import_module("mlflow.tracking")
    except ImportError:
        return None
    return _MLflowRun(tracking.MlflowClient(), run_id)


@contextlib.contextmanager
def system_metrics() -> Iterator[None]:
    """While the block runs, MLflow's own monitor samples this node (CPU, memory, disk, network;
    GPUs when nvidia-ml-py is installed) into the job's run as `system/...` metrics, every
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10). Here, not in the task: the
    figures that matter are the node's. Nothing happens off rank 0, without a run, or without
    mlflow and psutil installed; a tracking server that is down only loses the samples."""
    monitor = _system_monitor()
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def _system_monitor():
    run_id = _job_run()
    if run_id is None:
        return None
    try:
        importlib.import_module("psutil")  # the monitor's own dependency, optional for us
        monitors = importlib.import_module("mlflow.system_metrics.system_metrics_monitor")
    except ImportError:
        return None
    try:  # resume: a requeued job's samples continue the run's steps
        monitor = monitors.SystemMetricsMonitor(run_id, resume_logging=True)
        monitor.start()
    except Exception as exc:  # tracking must never stop the work
        log.warning("no system metrics: %s", redact_text(str(exc)))
        return None
    return monitor
