"""The figures a flow run is compared by: its MLflow parent run's metrics, so that two lifecycle
runs sit side by side in MLflow's runs table. Taken from the artifacts the run built or found
cached: the trained model's last losses, the evaluation's scores, the export's logit difference
from its source; and, as params (they describe, not measure), the trained model's size."""

from __future__ import annotations

import math
from typing import Any

from engine.registry import TRAINING_SIZE
from tasks.artifact import ArtifactRef, trained_ref

TRAINING = ("loss", "valid_loss", "valid_ppl")


def headline(refs: dict[str, ArtifactRef]) -> dict[str, float]:
    figures: dict[str, Any] = {}
    trained = trained_ref(refs)
    if trained is not None:
        figures |= {f"train/{key}": trained.summary.get(key) for key in TRAINING}
    if "convert" in refs:
        figures["export/max_abs_diff"] = (refs["convert"].summary.get("verification") or {}).get(
            "max_abs_diff")
    if "evaluate" in refs:
        figures |= {f"eval/{name}": value
                    for name, value in refs["evaluate"].summary.get("metrics", {}).items()}
    return {key: float(value) for key, value in figures.items() if is_number(value)}


def headline_settings(refs: dict[str, ArtifactRef]) -> dict[str, str]:
    """What the trained model is (its training size), as the parent run's params `train.<key>`."""
    trained = trained_ref(refs)
    if trained is None:
        return {}
    return {f"train.{key}": str(trained.summary[key]) for key in TRAINING_SIZE
            if key in trained.summary}


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what MLflow takes as a metric value."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
