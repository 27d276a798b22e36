"""Reading a job's log files while they grow: only complete lines, each once, so a caller can
stream rank 0's output into its own log (a Prefect task's) without holding the file open."""

from __future__ import annotations

from collections import deque
from pathlib import Path


class LogFollower:
    """New complete lines of one file since the last call; a partial last line waits for its
    newline. A file that does not exist yet has no lines."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in lines]


def tail(path: str | Path, n: int) -> list[str]:
    """The last n lines of a file (none if it does not exist)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=n)]
    except FileNotFoundError:
        return []
