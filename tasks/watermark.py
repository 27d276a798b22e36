"""Which corpus shards of a drop folder a nightly flow has not consumed yet. The consumed ones
are listed in a watermark file kept with the artifacts (`$LMFORGE_HOME/nightly/<name>/
watermark.json`), written (temp name, then rename) only when a night has finished, so a night
that fails leaves its shards new for the next run, which then finds its finished stages in the
cache. A shard is known by its name, size and modification time: a file rewritten under the
same name is new again."""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.atomic import temp_name
from engine.data.tokenize import resolve_inputs
from engine.errors import InputError
from tasks.home import lmforge_home

WATERMARK = "watermark.json"


def nightly_dir(name: str) -> Path:
    """The nightly flow's own files for registered model `name` (watermark, history, lease)."""
    return lmforge_home() / "nightly" / name


def shard_id(path: Path) -> str:
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def consumed(name: str) -> dict[str, str]:
    """shard path -> its id when consumed, from the watermark (empty before the first night)."""
    file = nightly_dir(name) / WATERMARK
    return json.loads(file.read_text())["shards"] if file.is_file() else {}


def new_shards(drop: str, name: str) -> list[Path]:
    """The JSONL shards in `drop` (a folder or glob) not consumed by an earlier night, sorted;
    InputError when `drop` names no JSONL file at all."""
    try:
        shards = [Path(p) for p in resolve_inputs([drop])]
    except InputError as exc:
        raise InputError(f"drop {drop!r}: {exc}") from None
    seen = consumed(name)
    return [p for p in shards if seen.get(str(p)) != shard_id(p)]


def commit(name: str, shards: list[Path], night: dict) -> None:
    """Record `shards` as consumed by the night described by `night` (its flow run, outcome)."""
    folder = nightly_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / WATERMARK
    state = json.loads(file.read_text()) if file.is_file() else {"shards": {}}
    state["shards"].update({str(p): shard_id(p) for p in shards})
    state["last"] = night
    tmp = temp_name(file)
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, file)
