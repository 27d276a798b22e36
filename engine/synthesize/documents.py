"""The corpus as numbered documents, streamed in order, and its split into work shards.

A document's index counts every non-blank line of the input files in order; shard k holds the
documents [k × shard_documents, (k + 1) × shard_documents). Both depend on the input alone, so
every rank, and a resumed run, cuts the corpus the same way without talking to the others.
"""

from __future__ import annotations

import gzip
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from engine.data.tokenize import bad_line, parse_line
from engine.errors import InputError


@dataclass(frozen=True)
class Document:
    index: int
    id: str
    text: str


def read_documents(files: list[Path], text_key: str, id_key: str | None) -> Iterator[Document]:
    """Every document of `files`, in order; a malformed line is an InputError naming it."""
    index = 0
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                text = _text(path, number, line, text_key)  # first: it checks the line's JSON
                yield Document(index, _document_id(path, number, line, id_key), text)
                index += 1


def _text(path: Path, number: int, line: bytes, key: str) -> str:
    parsed = parse_line(line, [key])
    if isinstance(parsed, str):
        raise InputError(bad_line(path, number, parsed))
    return parsed[0]


def _document_id(path: Path, number: int, line: bytes, key: str | None) -> str:
    if key is None:
        return f"{path.name}:{number}"
    value = json.loads(line).get(key)
    if value is None or isinstance(value, (dict, list)):
        raise InputError(bad_line(path, number, f"no id in key {key!r} (a string or number)"))
    return str(value)


def shards(documents: Iterator[Document], size: int) -> Iterator[tuple[int, list[Document]]]:
    """(shard number, its documents) in order."""
    for number, group in itertools.groupby(documents, key=lambda d: d.index // size):
        yield number, list(group)
