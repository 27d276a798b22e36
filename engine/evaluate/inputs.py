"""Reading evaluation text: strict UTF-8 and JSON, with errors that name the file and line, so a
bad file fails before any model time is spent on it."""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import InputError


def read_text(path: str | Path) -> str:
    """The whole file as text, newlines normalised to "\\n" as Python's text mode reads (CRLF
    files would otherwise be scored on their "\\r" tokens); a leading UTF-8 BOM is dropped."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 (byte {exc.start}: {exc.reason}); "
                         "convert the file to UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_jsonl(path: str | Path, key: str) -> list[str]:
    """The `key` string of every non-empty line of a JSON Lines file. Lines end at "\n" only
    (as the tokenize stage reads them): str.splitlines() would also cut at U+2028 and the other
    Unicode line breaks that JSON allows raw inside a string."""
    texts = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{number}: not valid JSON: {exc}") from None
        if not isinstance(row, dict) or not isinstance(row.get(key), str):
            raise InputError(f"{path}:{number}: no string field {key!r} (set the text key)")
        texts.append(row[key])
    return texts
