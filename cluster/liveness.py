"""Which ranks of a job are still there, so that a rank whose collective broke can tell a peer
that failed (it says so in failed.json) from a peer that vanished: its node lost, or its processes
killed, with nobody left to say a word.

Each rank's launcher keeps a heartbeat file in the run folder — written when its engine starts,
touched at each check of its wait loop (every 2 s; at most once per HEARTBEAT_S) while the engine
runs, removed when the launcher is done with it. Only a change
of a file's mtime counts as a beat, never its value, so clocks of different nodes never meet.
Reads go through open() so that NFS's close-to-open consistency shows fresh attributes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from cluster.attempts import node_name
from cluster.layout import RunDir

HEARTBEAT_S = 1.0
LOST_AFTER_S = 8.0  # three beats missed: a peer this silent is gone, not busy
CHECK_EVERY_S = 0.5


def restart_count() -> int:
    """Which start of the job this is (Slurm counts requeues); beats of another start are old."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


class Heartbeat:
    def __init__(self, run: RunDir, rank: int) -> None:
        self.path = run.heartbeat(rank)
        self._last = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        run.write_json(self.path, {"rank": rank, "host": node_name(), "start": restart_count()})

    def beat(self) -> None:
        if time.monotonic() - self._last >= HEARTBEAT_S:
            self._last = time.monotonic()
            os.utime(self.path)

    def stop(self) -> None:
        self.path.unlink(missing_ok=True)


def _read(run: RunDir, rank: int) -> tuple[int, dict[str, Any]] | None:
    """(mtime, record) of a peer's heartbeat of this start of the job; None when it has none."""
    try:
        with open(run.heartbeat(rank), encoding="utf-8") as f:
            mtime, record = os.fstat(f.fileno()).st_mtime_ns, json.load(f)
    except (FileNotFoundError, ValueError):
        return None  # not started, done, or being written this instant
    return (mtime, record) if record.get("start") == restart_count() else None


def silent_peers(run: RunDir, rank: int, world_size: int,
                 beat: Callable[[], None]) -> list[dict[str, Any]] | None:
    """The peers of `rank` that do not beat for LOST_AFTER_S, as their heartbeat records
    ({"rank", "host", ...}); [] once every running peer has beaten; None as soon as another rank
    claims the failure (failed.json). Our own heartbeat goes on meanwhile (`beat`)."""
    peers = {r: _read(run, r) for r in range(world_size) if r != rank}
    waiting = {r: seen for r, seen in peers.items() if seen is not None}
    deadline = time.monotonic() + LOST_AFTER_S
    while waiting and time.monotonic() < deadline:
        if run.failed.exists():
            return None
        time.sleep(CHECK_EVERY_S)
        beat()
        waiting = {r: seen for r, seen in waiting.items() if _read(run, r) == seen}
    return None if run.failed.exists() else [record for _, record in waiting.values()]
