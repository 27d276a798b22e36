"""The bad-input table: every row (tests/bad_inputs_*.py) is one bad input given to one stage,
which must exit 2 with a message naming the file, line or field, and leave neither its outputs
nor a temporary file behind. docs/reliability.md shows the same table:
`python -m tests.test_bad_inputs` prints it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.__main__ import main
from tests import bad_inputs_checkpoints, bad_inputs_data, bad_inputs_models
from tests.badinput import BadInput

ROWS: list[BadInput] = bad_inputs_data.ROWS + bad_inputs_models.ROWS + bad_inputs_checkpoints.ROWS
DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.stage}: {r.case}" for r in ROWS])
def test_bad_input(row: BadInput, fixtures, tmp_path, capsys):
    argv = row.argv(tmp_path, fixtures)
    capsys.readouterr()
    code = main([row.stage, *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(row.message.replace("{tmp}", re.escape(str(tmp_path))), err), err
    assert "Traceback" not in err
    assert [out for out in row.outputs if (tmp_path / out).exists()] == []
    assert list(tmp_path.rglob("*.tmp*")) == []


def markdown_table(rows: list[BadInput]) -> str:
    lines = ["| stage | bad input | the error (exit 2) | not left behind |", "|---|---|---|---|"]
    for row in rows:
        gone = ", ".join(f"`{out}`" for out in row.outputs) or "—"
        message = row.doc_message.replace("|", "\\|")
        lines.append(f"| {row.stage} | {row.case} | `{message}` | {gone}, temporary files |")
    return "\n".join(lines) + "\n"


def test_docs_show_the_table():
    shown = [r for r in ROWS if not re.search(r.message.replace("{tmp}", "…"), r.doc_message)]
    assert shown == [], "a row's message in the docs is not the one its test expects"
    assert markdown_table(ROWS) in DOC.read_text(), \
        "docs/reliability.md is out of date: paste `python -m tests.test_bad_inputs` into it"


if __name__ == "__main__":
    print(markdown_table(ROWS), end="")
