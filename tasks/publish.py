"""A Prefect artifact per stage run: its key figures as a table, with where the artifact lies and a
link to its MLflow run, so the Prefect UI answers "what did this stage produce" without a shell.
Shown redacted (engine/redact.py), as everything lmforge shows."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import acreate_table_artifact

from engine.metrics import flatten
from engine.redact import redact, redact_text
from tasks.artifact import ArtifactRef

MAX_ROWS = 30


def key_figures(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Scalar summary entries (numbers, short strings), nested sections flattened."""
    rows = []
    for name, value in flatten(redact(summary)).items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        if isinstance(value, float):
            value = float(f"{value:.6g}")
        if isinstance(value, str) and len(value) > 80:
            continue
        rows.append({"figure": name, "value": value})
    return rows[:MAX_ROWS]


async def publish(ref: ArtifactRef, mlflow_link: str | None) -> None:
    how = "cached: built earlier" if ref.cached else "built"
    lines = [f"**{ref.stage}** ({ref.kind}, {how})", "", f"`{ref.path}`", "",
             f"fingerprint `{ref.fingerprint[:16]}`"]
    if mlflow_link:
        lines += ["", f"[MLflow run]({mlflow_link})"]
    await acreate_table_artifact(table=key_figures(ref.summary) or [{"figure": "-", "value": "-"}],
                                 key=f"lmforge-{ref.stage}",
                                 description=redact_text("\n".join(lines)))
