"""A flow run at a glance in Prefect: one Markdown artifact per flow run, keyed by the flow
(`<flow>-summary`, so the Artifacts page shows each flow's runs one after another): what the run
built and what it found cached, the headline figures (tasks/headline.py, the same as its MLflow
parent run's metrics), and links to that parent run and to the model version it registered.
Shown redacted (engine/redact.py), as everything lmforge shows."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from prefect.artifacts import acreate_markdown_artifact
from prefect.runtime import flow_run

from engine.redact import redact_text
from tasks.artifact import ArtifactRef
from tasks.headline import headline
from tasks.models import SCHEME
from tasks.tracking import flow_parent, run_link, ui_url


def summary_key(flow_name: str) -> str:
    """Prefect artifact keys take lowercase letters, digits and dashes only."""
    return f"{flow_name.replace('_', '-')}-summary"


def model_version_link(uri: str) -> str:
    """`models:/NAME/VERSION` -> the version's page in the MLflow UI."""
    name, _, version = uri.removeprefix(SCHEME).rpartition("/")
    return f"{ui_url()}/#/models/{quote(name, safe='')}/versions/{version}"


async def publish_summary(refs: dict[str, ArtifactRef], details: str = "") -> None:
    """The summary of the flow run we are in, from the artifacts it put in `refs`; `details`:
    more Markdown for the end (compare: its table)."""
    experiment, parent = await asyncio.to_thread(flow_parent)
    name = flow_run.get_flow_name()
    links = [f"[MLflow parent run]({run_link(experiment, parent)})"]
    links += [f"registered model [{ref.registered}]({model_version_link(ref.registered)})"
              for ref in refs.values() if ref.registered]
    lines = [f"## {name}: {flow_run.get_name()}", "", " · ".join(links), "",
             "| step | stage | kind | | path |", "|---|---|---|---|---|"]
    for step, ref in refs.items():
        how = "cached" if ref.cached else "built"
        if ref.mlflow_run_id:
            how = f"[{how}]({run_link(experiment, ref.mlflow_run_id)})"
        lines.append(f"| {step} | {ref.stage} | {ref.kind} | {how} | `{ref.path}` |")
    figures = headline(refs)
    if figures:
        lines += ["", "| figure | value |", "|---|---|"]
        lines += [f"| {key} | {value:.6g} |" for key, value in figures.items()]
    if details:
        lines += ["", details]
    built = sum(not ref.cached for ref in refs.values())
    await acreate_markdown_artifact(
        markdown=redact_text("\n".join(lines)), key=summary_key(name),
        description=f"{name}: {built} built, {len(refs) - built} cached")
