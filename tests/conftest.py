"""Shared test fixtures: paths to the real test material in ../shared/data (never used by the
project at run time) and small helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"test material {path} is not present")
    return path


@pytest.fixture
def llama2_sp() -> Path:
    return shared("tokenizers", "llama2", "tokenizer.model")


@pytest.fixture
def write_jsonl(tmp_path):
    def write(name: str, rows: list, raw_lines: list[bytes] | None = None) -> Path:
        path = tmp_path / name
        with open(path, "wb") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
            for line in raw_lines or []:
                f.write(line + b"\n")
        return path
    return write
