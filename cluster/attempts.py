"""Attempts of one job: every start (the first, and each after a requeue) appends a record to the
run folder, so that preemptions and time limits stay visible after the job succeeds — on the Job,
and in the stage's manifest (`summary.attempts`).

Reasons: `submitted` (the first attempt); `timeout` (the previous attempt got the warning signal
near its time limit); `preempted` (a stop signal well before the limit: preemption, `scontrol
requeue`, `scancel --signal=USR2`); `requeued` (the previous attempt ended without a word — a node
failure or a SIGKILL — and Slurm requeued the job).
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from cluster.layout import RunDir
from engine.manifest import Manifest, write_manifest

Reason = Literal["submitted", "timeout", "preempted", "requeued"]


class Attempt(BaseModel):
    number: int
    reason: Reason
    start_step: int | None  # latest checkpoint iteration when it started (resumable stages)
    started_at: str
    host: str


def read_attempts(run: RunDir) -> list[Attempt]:
    try:
        text = run.attempts.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [Attempt.model_validate_json(line) for line in text.splitlines() if line.strip()]


def record_stop(run: RunDir, reason: Reason) -> None:
    """Say why this attempt stops; the next attempt takes it as its reason."""
    run.write_json(run.stop, {"reason": reason, "at": _now()})


def begin_attempt(run: RunDir, checkpoint_dir: str | None) -> Attempt:
    """Record a new attempt (rank 0 only). `checkpoint_dir`: where a resumable stage keeps its
    checkpoints, whose latest iteration is the attempt's start step."""
    previous = read_attempts(run)
    stop = run.read_json(run.stop)
    run.stop.unlink(missing_ok=True)
    reason = "submitted" if not previous else (stop or {}).get("reason", "requeued")
    start_step = None
    if checkpoint_dir is not None:
        start_step = 0
        if Path(checkpoint_dir).is_dir():  # a fresh run has no folder: spare the torch import
            from engine.checkpoint.latest import latest_iteration

            start_step = latest_iteration(checkpoint_dir) or 0
    attempt = Attempt(number=len(previous) + 1, reason=reason, start_step=start_step,
                      started_at=_now(), host=node_name())
    with open(run.attempts, "a", encoding="utf-8") as f:
        f.write(attempt.model_dump_json() + "\n")
    return attempt


def with_attempts(manifest: Manifest, attempts: list[Attempt], artifact: str | None) -> Manifest:
    """The manifest with `summary.attempts`, rewritten in place (atomically) when the artifact's
    location is known."""
    summary = {**manifest.summary, "attempts": [a.model_dump() for a in attempts]}
    manifest = manifest.model_copy(update={"summary": summary})
    if artifact is not None:
        write_manifest(artifact, manifest)
    return manifest


def node_name() -> str:
    """Slurm's name for this node (several fake nodes may share a host), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
