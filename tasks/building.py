"""Which job is building an artifact: `<location>.job.json`, written when the task has submitted
the job, removed once the job has ended or been cancelled. A Slurm job outlives the flow that
submitted it (its worker killed, its process gone); this record lets the next run that needs the
artifact follow that job, into the same MLflow run, instead of building the artifact a second
time beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.jobs import Job
from engine.atomic import atomic_write_text


def record_path(location: str) -> Path:
    return Path(f"{location}.job.json")


def record_job(location: str, job: Job, **about: Any) -> None:
    atomic_write_text(record_path(location), json.dumps({"job_dir": str(job.run.root), **about}))


def forget_job(location: str) -> None:
    record_path(location).unlink(missing_ok=True)


def running_job(location: str) -> tuple[Job, dict[str, Any]] | None:
    """The job recorded for `location` and its record, while the job still runs; a record of a
    job that has ended is removed (its outcome is the artifact, or nothing)."""
    try:
        record = json.loads(record_path(location).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    job = Job.attach(record["job_dir"])
    if job is not None and not job.done():
        return job, record
    forget_job(location)
    return None
