"""Which checkpoint is the latest: readable without importing torch (cluster/ reads it at every
job start to record the step an attempt resumes from)."""

from __future__ import annotations

from pathlib import Path

from engine.errors import InputError

LATEST = "latest_checkpointed_iteration.txt"


def latest_iteration(root: str | Path) -> int | None:
    """The iteration named in latest_checkpointed_iteration.txt, or None for an empty folder."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise InputError(f"{path}: expected an iteration number, found {text[:40]!r}")
    return int(text)
