"""The work folder of a run, `<output>/generated/`: the unit of resume is a shard.

`plan.json` records what the shards were generated from (their fingerprint: the spec's
generation fields and the inputs), so that a run resumes only shards of the same generation and
never mixes another teacher's rows in. Shard k is `shard-<k>.jsonl` (its rows, one per
completion) and `shard-<k>.json` (its counts and timing), each written under a temporary name and
renamed; the rows file, written last, is what makes the shard finished. A killed run leaves at
most temporaries behind, which the next writer of that shard sweeps (engine.atomic).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from engine.atomic import atomic_write_text, fsync_dir, temp_name
from engine.errors import InputError

WORK = "generated"


class ShardStore:
    def __init__(self, output: str | Path) -> None:
        self.root = Path(output) / WORK

    def open(self, plan: dict) -> None:
        """Start or resume: InputError when the folder holds another generation's shards."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "plan.json"
        if path.is_file():
            found = json.loads(path.read_text(encoding="utf-8"))
            if found != plan:
                raise InputError(f"{self.root}: holds shards of another generation (fingerprint "
                                 f"{found.get('fingerprint', '?')[:16]}, this spec's "
                                 f"{plan['fingerprint'][:16]}): choose another output folder, "
                                 f"or remove it")
            return
        atomic_write_text(path, json.dumps(plan, indent=2, sort_keys=True) + "\n")

    def rows_path(self, shard: int) -> Path:
        return self.root / f"shard-{shard:05d}.jsonl"

    def stats_path(self, shard: int) -> Path:
        return self.root / f"shard-{shard:05d}.json"

    def done(self, shard: int) -> bool:
        return self.rows_path(shard).is_file() and self.stats_path(shard).is_file()

    def write(self, shard: int, rows: list[dict], stats: dict) -> None:
        """Stats first, then rows: a shard whose rows file exists is complete."""
        atomic_write_text(self.stats_path(shard), json.dumps(stats, sort_keys=True) + "\n")
        path = self.rows_path(shard)
        tmp = temp_name(path)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(self.root)
        finally:
            tmp.unlink(missing_ok=True)

    def rows(self, shard: int) -> Iterator[dict]:
        with open(self.rows_path(shard), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def stats(self, shard: int) -> dict:
        return json.loads(self.stats_path(shard).read_text(encoding="utf-8"))
