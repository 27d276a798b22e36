"""One row of the bad-input table (docs/reliability.md): a stage given one bad input must exit 2
with a message naming the file, line or field, and leave nothing behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class BadInput:
    stage: str  # engine stage name
    case: str  # what is bad, in a few words (the docs' row title)
    argv: Callable[[Path, dict], list[str]]  # (tmp, fixtures) -> CLI args; writes the bad files
    message: str  # regex the stderr must match, {tmp} standing for the tmp folder
    outputs: tuple[str, ...] = ()  # paths relative to tmp that must not exist afterwards
    doc_message: str = ""  # the message as shown in docs (the tmp folder written as `…/`)
