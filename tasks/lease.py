"""A lease file stops two flows from building the same artifact at once.

`<location>.lease` is created with O_EXCL (atomic on local filesystems and NFSv3+): whoever
creates it builds; the others wait for it to go away and then find the artifact finished. The
file names its holder (pid, host, flow run, a random token) and its mtime is the holder's
heartbeat. A lease is stale — taken over — when its holder's process is gone (checked on the
holder's host) or, seen from another host, when its heartbeat is older than `stale_after_s` (a
killed flow, a lost node). Only the holder (matching token) removes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.process import pid_alive

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class LeaseTimeout(TimeoutError):
    """Another live holder kept the lease for longer than we were willing to wait."""


@dataclass
class Lease:
    path: Path
    owner: dict[str, Any] = field(default_factory=dict)  # e.g. {"flow_run": ...}
    stale_after_s: float = STALE_AFTER_S
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def try_acquire(self) -> bool:
        """Create the lease, or take over a stale one; False while a live holder has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # create, or clear a stale lease and create again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._clear_if_stale():
                    return False
                continue
            record = {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
                      "acquired_at": time.time(), **self.owner}
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f)
            return True
        return False

    async def acquire(self, timeout_s: float, poll_s: float = 2.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise LeaseTimeout(f"{self.path} is held by {self.holder()} for over "
                                   f"{timeout_s:.0f} s; remove the file if that holder is gone")
            await asyncio.sleep(poll_s)

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None  # gone, or being written this instant

    def held(self) -> bool:
        return (self.holder() or {}).get("token") == self.token

    def beat(self) -> None:
        if self.held():
            os.utime(self.path)

    async def heartbeat(self, every_s: float = HEARTBEAT_S) -> None:
        """Keep the lease fresh until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            self.beat()

    def release(self) -> None:
        if self.held():
            self.path.unlink(missing_ok=True)

    def _clear_if_stale(self) -> bool:
        holder = self.holder()
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: try again
        if holder is None and age < 5:
            return False  # being written right now
        if not _stale(holder, age, self.stale_after_s):
            return False
        # Rename before deleting, so that of two contenders only one clears it; the loser may
        # have renamed the winner's fresh lease instead, and puts it back.
        aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return True
        try:
            taken = json.loads(aside.read_text(encoding="utf-8"))
        except ValueError:
            taken = None
        if taken is not None and holder is not None and taken.get("token") != holder.get("token"):
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)
        return True


def _stale(holder: dict[str, Any] | None, age_s: float, stale_after_s: float) -> bool:
    """On the holder's own host its process decides (a busy holder may miss heartbeats);
    elsewhere only the heartbeat can."""
    if holder is None:
        return True
    if holder.get("host") == socket.gethostname():
        return not pid_alive(int(holder.get("pid", -1)))
    return age_s > stale_after_s
