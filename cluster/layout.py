"""The run folder of one submitted stage: the single place that names its files, so the caller
(cluster/jobs.py) and every rank of the job (cluster/bootstrap.py) agree on them.

    <run>/spec.json          the validated stage spec the engine reads (`--config`)
    <run>/job.json           stage, executor, job id, resources, profile
    <run>/attempts.jsonl     one line per attempt: number, reason, start_step, started_at, host
    <run>/stop.json          why the latest attempt stopped (read by the next attempt)
    <run>/failed.json        the first rank whose engine failed: rank, exit code, log tail
    <run>/lost.json          ranks that went silent (a node lost): who, where, seen by whom
    <run>/heartbeats/        one file per running rank, touched every few seconds
    <run>/logs/rank_00000.log   each rank's engine output (stdout + stderr), all attempts
    <run>/submitit/          submitit's pickles, sbatch script and its own per-task logs

The folder must be visible from every node (a shared filesystem), like the artifacts.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.atomic import atomic_write_text


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def create(cls, root: str | Path) -> "RunDir":
        run = cls(Path(root).expanduser().absolute())
        (run.root / "logs").mkdir(parents=True, exist_ok=True)
        return run

    @staticmethod
    def new_name(stage: str) -> str:
        """`<stage>-<time>-<random>`: sorts by time, never collides."""
        return f"{stage}-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def job(self) -> Path:
        return self.root / "job.json"

    @property
    def attempts(self) -> Path:
        return self.root / "attempts.jsonl"

    @property
    def stop(self) -> Path:
        return self.root / "stop.json"

    @property
    def failed(self) -> Path:
        return self.root / "failed.json"

    @property
    def lost(self) -> Path:
        return self.root / "lost.json"

    def heartbeat(self, rank: int) -> Path:
        return self.root / "heartbeats" / f"rank_{rank:05d}.json"

    @property
    def submitit(self) -> Path:
        return self.root / "submitit"

    def rank_log(self, rank: int) -> Path:
        return self.root / "logs" / f"rank_{rank:05d}.log"

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")

    def read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def claim_failed(self, data: dict[str, Any]) -> bool:
        """Write failed.json unless another rank already did: the first failure is the cause,
        later ones are usually its consequences (a peer vanished mid-collective)."""
        try:
            fd = os.open(self.failed, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        return True
