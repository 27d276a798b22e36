"""FinEval's official layout, read strictly: `<folder>/<split>/<subject>_<split>.csv` with columns
`id,question,A,B,C,D,answer[,explanation]`, and the subject -> [subject, 中文名, category] mapping.

The real files have a UTF-8 BOM in some splits, CRLF line endings, quoted multi-line fields and
one answer written "D " (trailing space); all are accepted. A missing column, an answer outside
A-D or a file that is not UTF-8 stops the run with the file, line and row named.

`fineval_subject_mapping.json` is a byte copy of FinEval's `subject_mapping.json`
(SUFE-AIFLM-Lab/FinEval, code/subject_mapping.json, Apache-2.0), shipped so that no data
folder needs to carry it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InputError
from engine.evaluate.inputs import read_text

CHOICES = ("A", "B", "C", "D")
REQUIRED = ("id", "question", *CHOICES, "answer")
MAPPING = Path(__file__).with_name("fineval_subject_mapping.json")
SHOT_SPLIT = "dev"


@dataclass(frozen=True)
class Question:
    subject: str
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str
    where: str  # "file:line", for messages

    def fields(self) -> dict[str, str]:
        return {"question": self.question, **dict(zip(CHOICES, self.options)),
                "answer": self.answer}


@dataclass(frozen=True)
class Subject:
    name: str
    name_zh: str
    category: str


def read_questions(path: Path, subject: str) -> list[Question]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = next(reader, None)
    if header is None:
        raise InputError(f"{path}: empty file (expected a header {','.join(REQUIRED)})")
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise InputError(f"{path}:1: missing column(s) {', '.join(missing)} "
                         f"(header: {','.join(header)}; expected {','.join(REQUIRED)})")
    col = {name: header.index(name) for name in REQUIRED}
    questions = []
    for row_number, row in enumerate(reader, start=1):
        where = f"{path}:{reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(col.values()):
            raise InputError(f"{where}: row {row_number} has {len(row)} fields, the header "
                             f"has {len(header)}")
        answer = row[col["answer"]].strip()
        if answer not in CHOICES:
            raise InputError(f"{where}: row {row_number} (id {row[col['id']]}): answer "
                             f"{row[col['answer']]!r} is not one of A, B, C, D")
        questions.append(Question(subject, row[col["id"]].strip(), row[col["question"]],
                                  tuple(row[col[c]] for c in CHOICES), answer, where))
    return questions


def read_mapping(path: str | Path | None = None) -> dict[str, Subject]:
    """subject -> Subject; FinEval's own mapping unless another file is given."""
    path = Path(path) if path else MAPPING
    try:
        raw = json.loads(read_text(path))
        return {key: Subject(key, str(value[1]), str(value[2])) for key, value in raw.items()}
    except (ValueError, TypeError, IndexError, AttributeError):
        raise InputError(f"{path}: expected FinEval's subject mapping "
                         "{subject: [subject, 中文名, category], ...}") from None


def subject_files(folder: Path, split: str) -> dict[str, Path]:
    split_dir = folder / split
    if not split_dir.is_dir():
        raise InputError(f"{folder}: no {split}/ folder (expected FinEval's layout "
                         f"{split}/<subject>_{split}.csv)")
    suffix = f"_{split}.csv"
    files = {p.name[:-len(suffix)]: p for p in sorted(split_dir.glob(f"*{suffix}"))}
    if not files:
        raise InputError(f"{split_dir}: no *{suffix} files")
    return files


@dataclass
class FinEval:
    """The questions to answer and the dev questions used as shots, per subject."""

    subjects: list[Subject]
    questions: dict[str, list[Question]]
    shots: dict[str, list[Question]]


def load(folder: str | Path, split: str, subjects: list[str] | None, mapping_path: str | None,
         max_shots: int, limit: int | None) -> FinEval:
    folder = Path(folder)
    mapping = read_mapping(mapping_path)
    files = subject_files(folder, split)
    names = subjects or sorted(files)
    unknown = [s for s in names if s not in files]
    if unknown:
        raise InputError(f"{folder / split}: no file for subject(s) {', '.join(unknown)}")
    unmapped = [s for s in names if s not in mapping]
    if unmapped:
        raise InputError(f"{folder / split}: subject(s) {', '.join(unmapped)} are not in the "
                         f"subject mapping {mapping_path or MAPPING}")
    questions = {s: read_questions(files[s], s)[:limit] for s in names}
    shots: dict[str, list[Question]] = {}
    if max_shots:
        dev = subject_files(folder, SHOT_SPLIT)
        for s in names:
            if s not in dev:
                raise InputError(f"{folder / SHOT_SPLIT}: no {s}_{SHOT_SPLIT}.csv for the shots")
            shots[s] = read_questions(dev[s], s)
            if len(shots[s]) < max_shots:
                raise InputError(f"{dev[s]}: {len(shots[s])} questions, fewer than the "
                                 f"{max_shots} shots asked for")
    return FinEval([mapping[s] for s in names], questions, shots)
