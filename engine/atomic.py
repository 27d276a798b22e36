"""Nothing half-written: files are built under a temporary name and renamed into place at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from engine.errors import InputError


def temp_name(path: str | Path) -> Path:
    """A sibling of `path` that no other writer uses (same filesystem, so rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = temp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class StagedFiles:
    """Several output files that appear under their final names together, or not at all.

    `stage(final)` hands out a temporary path; `commit()` renames them all; leaving the `with`
    block without commit (an error, Ctrl-C) deletes every temporary file.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self.committed = False

    def stage(self, final: str | Path) -> Path:
        tmp = temp_name(final)
        self._pending.append((tmp, Path(final)))
        return tmp

    def commit(self) -> None:
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self.committed = True

    def discard(self) -> None:
        for tmp, _ in self._pending:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.discard()


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Build a directory artifact in `<final>.tmp-<id>` and rename it into place when the block
    succeeds; on failure the temporary directory is removed and `final` never appears."""
    final = Path(final)
    if final.exists() and any(final.iterdir()):
        raise InputError(f"{final}: output folder exists and is not empty")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            final.rmdir()
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
