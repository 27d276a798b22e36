"""Models evaluated side by side, published: one Markdown table (a Prefect artifact, and a file
of the flow's MLflow parent run), a bar chart per metric (an MLflow figure), the figures that
vary with the context length as lines against it (an MLflow figure, shown in Prefect as an
image artifact served by MLflow), and each model's figures as the parent run's metrics
(`<label>/<metric>`), so that runs of a flow compare in MLflow's runs table. Used by the
compare, compress and extend flows."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure
from mlflow.entities import Metric
from prefect.artifacts import acreate_image_artifact, acreate_markdown_artifact

from engine.evaluate.report import REPORT_JSON, compare_reports
from tasks.headline import is_number
from tasks.plots import comparison_chart, length_chart
from tasks.tracking import artifact_url, client, metric_name

LENGTH_CHART = "by_context_length.png"


async def publish_figure(parent: str, figure: Figure, path: str, key: str,
                         description: str) -> None:
    """`figure` as `path` in the MLflow run `parent`, shown in Prefect as image artifact `key`
    (served by MLflow's get-artifact)."""
    client().log_figure(parent, figure, path)
    await acreate_image_artifact(image_url=artifact_url(parent, path), key=key,
                                 description=description)


async def publish_comparison(parent: str | None, labels: list[str], reports: list[Path],
                             key: str, description: str) -> str:
    """The comparison table of `reports` (evaluate outputs, one per label), published; returned."""
    files = [Path(r) / REPORT_JSON if Path(r).is_dir() else Path(r) for r in reports]
    table = compare_reports(files, labels)
    await acreate_markdown_artifact(markdown=table, key=key, description=description)
    if parent is None:
        return table
    mlflow = client()
    mlflow.log_text(parent, table, "comparison.md")
    loaded = [json.loads(f.read_text()) for f in files]
    chart = comparison_chart(labels, loaded)
    if chart is not None:
        mlflow.log_figure(parent, chart, "comparison.png")
    lengths = length_chart(labels, loaded)
    if lengths is not None:
        await publish_figure(parent, lengths, LENGTH_CHART, f"{key}-by-length", description)
    figures = [Metric(metric_name(f"{label}/{name}"), float(value), 0, 0)
               for label, report in zip(labels, loaded)
               for name, value in {"parameters": report["model"]["parameters"],
                                   **report["metrics"]}.items() if is_number(value)]
    for i in range(0, len(figures), 1000):
        mlflow.log_batch(parent, metrics=figures[i:i + 1000])
    return table
