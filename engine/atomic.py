"""Nothing half-written: files are built under a temporary name and renamed into place at the end.

A temporary name carries its writer's host and pid (`<name>.tmp-<host>-<pid>-<random>`), so the
next writer of the same output removes what a killed writer left (kill -9, a node restart) and
never what a live one is still writing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from engine.errors import InputError
from engine.process import pid_alive, this_host

_TEMP = ".tmp-"


def temp_name(path: str | Path) -> Path:
    """A sibling of `path` that no other writer uses (same filesystem, so rename is atomic)."""
    path = Path(path)
    sweep_stale_temps(path)
    return path.with_name(f"{path.name}{_TEMP}{this_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def sweep_stale_temps(path: str | Path) -> None:
    """Remove temporaries of `path` whose writer, on this host, is gone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f"{path.name}{_TEMP}*"):
        writer = tmp.name[len(path.name) + len(_TEMP):].rpartition("-")[0]  # <host>-<pid>
        host, _, pid = writer.rpartition("-")
        if host == this_host() and pid.isdigit() and not pid_alive(int(pid)):
            remove_path(tmp)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` survive a power loss, not only a killed process."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_parents(path: Path) -> list[Path]:
    """Create `path`'s missing parent folders; the ones created, deepest first."""
    created, parent = [], path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove folders an output created, deepest first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


class StagedFiles:
    """Several output files that appear under their final names together, or not at all.

    `stage(final)` hands out a temporary path; `commit()` renames them all; leaving the `with`
    block without commit (an error, Ctrl-C) deletes every temporary file, and the folders staging
    created.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self._created: list[Path] = []
        self.committed = False

    def stage(self, final: str | Path) -> Path:
        self._created += make_parents(Path(final))
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
        remove_empty(self._created)

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.discard()


def check_output_free(final: str | Path) -> None:
    """A stage's output folder may be absent or empty, nothing else."""
    final = Path(final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise InputError(f"{final}: output folder exists and is not empty")


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Build a directory artifact in `<final>.tmp-<id>` and rename it into place when the block
    succeeds; on failure the temporary directory is removed and `final` never appears."""
    final = Path(final)
    check_output_free(final)
    created = make_parents(final)
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
            remove_empty(created)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_WORDS = ("no space left", "os error 28", "disk quota exceeded")


def out_of_space(exc: BaseException, where: str | Path) -> InputError | None:
    """The user's error for a write that failed because `where`'s filesystem is full, or None.

    Writers report it differently: an OSError with ENOSPC, a Rust error's text, or (torch.save's
    zip writer) only "unexpected pos": then the filesystem's free space, read before the partial
    output is removed, tells.
    """
    chain, seen = [exc], set()
    while chain[-1].__cause__ or chain[-1].__context__:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if id(nxt) in seen:
            break
        seen.add(id(nxt))
        chain.append(nxt)
    full = any(getattr(e, "errno", None) in _NO_SPACE
               or any(w in str(e).lower() for w in _NO_SPACE_WORDS) for e in chain)
    if not full:
        existing = Path(where)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        full = shutil.disk_usage(existing).free < (1 << 20)
    return InputError(f"{where}: no space left on the device while writing it; "
                      f"nothing was left under its final name") if full else None
