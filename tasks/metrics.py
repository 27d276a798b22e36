"""The engine's JSON-lines metrics (engine/metrics.py) into an MLflow run, without duplicates.

The engine logs live to the run when the job's environment names it; this copies whatever is
missing afterwards — everything when tracking was unreachable from the job, nothing when the
live logging worked — comparing (key, step) pairs with the run's own history.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

BATCH = 1000  # MLflow's log_batch limit on metrics


def step_series(path: str | Path) -> dict[str, dict[int, tuple[float, int]]]:
    """key -> step -> (value, timestamp ms). A step logged again after a resume keeps its last
    value; non-finite values are left out (MLflow plots them badly, the JSON lines keep them)."""
    series: dict[str, dict[int, tuple[float, int]]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line) if line.strip() else {}
            if record.get("kind") != "metrics":
                continue
            ms = int(float(record.get("time", 0)) * 1000)
            for key, value in record["data"].items():
                if value is not None and math.isfinite(value):
                    series.setdefault(key, {})[int(record["step"])] = (float(value), ms)
    return series


def backfill(client: MlflowClient, run_id: str, series: dict[str, dict[int, tuple[float, int]]]) -> int:
    """Log the (key, step) points the run lacks; returns how many."""
    missing = []
    for key, points in series.items():
        have = {m.step for m in client.get_metric_history(run_id, key)}
        missing += [Metric(key, value, ms, step) for step, (value, ms) in sorted(points.items())
                    if step not in have]
    for i in range(0, len(missing), BATCH):
        client.log_batch(run_id, metrics=missing[i:i + BATCH])
    return len(missing)
