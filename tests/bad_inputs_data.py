"""Bad-input rows of the data stages: malformed JSONL given to train-tokenizer and tokenize (one
parser, one message: `<file>:<line>: <reason>`), and corrupt token datasets given to merge and
pretrain (refused when the dataset is opened: its structure, then its manifest's checksums).

Every bad file is built in the row's tmp folder from a copy of a fixture; the fixtures themselves
are never changed."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Callable

import yaml

from engine.data.indexed import HEADER
from tests.badinput import BadInput

GOOD_LINES = 20  # a bad line comes after this many of the corpus's own lines: it is line 21

Writer = Callable[[Path, dict], Path]  # (tmp, fixtures) -> the bad file or dataset prefix


def _corpus_lines(fx: dict) -> list[bytes]:
    return (Path(fx["corpus"]) / "stories-000.jsonl").read_bytes().splitlines(keepends=True)


def _with_line(bad: bytes) -> Writer:
    """The corpus's first GOOD_LINES lines, the bad line, then one more good line."""
    def write(tmp: Path, fx: dict) -> Path:
        lines = _corpus_lines(fx)
        path = tmp / "bad.jsonl"
        path.write_bytes(b"".join(lines[:GOOD_LINES]) + bad + b"\n" + lines[GOOD_LINES])
        return path
    return write


def _file(name: str, content: Callable[[dict], bytes]) -> Writer:
    def write(tmp: Path, fx: dict) -> Path:
        (tmp / name).write_bytes(content(fx))
        return tmp / name
    return write


def _gzip(fx: dict) -> bytes:
    return gzip.compress(b"".join(_corpus_lines(fx)), mtime=0)


LINE_CASES: list[tuple[str, Writer, str, str]] = [
    # (case, writer, message regex, message in the docs)
    ("broken JSON line", _with_line(b'{"id": 20, "text": "The end.'),
     r"{tmp}/bad\.jsonl:21: malformed JSON \(Unterminated string starting at column 20\)",
     "…/bad.jsonl:21: malformed JSON (Unterminated string starting at column 20)"),
    ("line without the text key", _with_line(b'{"id": 20, "title": "A story"}'),
     r"{tmp}/bad\.jsonl:21: missing key 'text'", "…/bad.jsonl:21: missing key 'text'"),
    ("text that is not a string", _with_line(b'{"id": 20, "text": ["a", "list"]}'),
     r"{tmp}/bad\.jsonl:21: key 'text' is list, not a string",
     "…/bad.jsonl:21: key 'text' is list, not a string"),
    ("line that is not a JSON object", _with_line(b'["text"]'),
     r"{tmp}/bad\.jsonl:21: expected a JSON object, got list",
     "…/bad.jsonl:21: expected a JSON object, got list"),
    ("invalid UTF-8 in a line", _with_line(b'{"text": "caf\xe9"}'),
     r"{tmp}/bad\.jsonl:21: invalid UTF-8 at byte 13",
     "…/bad.jsonl:21: invalid UTF-8 at byte 13"),
    ("binary file (gzip data named .jsonl)", _file("binary.jsonl", _gzip),
     r"{tmp}/binary\.jsonl:1: invalid UTF-8 at byte 1",
     "…/binary.jsonl:1: invalid UTF-8 at byte 1"),
    ("truncated .jsonl.gz", _file("cut.jsonl.gz", lambda fx: _gzip(fx)[:-100]),
     r"{tmp}/cut\.jsonl\.gz: cannot read: Compressed file ended before the end-of-stream marker",
     "…/cut.jsonl.gz: cannot read: Compressed file ended before the end-of-stream marker was "
     "reached"),
    ("empty file", _file("empty.jsonl", lambda fx: b""),
     r"{tmp}/empty\.jsonl: empty file", "…/empty.jsonl: empty file"),
]


def _train_tokenizer(write: Writer) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, fx: ["--input", str(write(tmp, fx)), "--output", str(tmp / "tok")]


def _tokenize(write: Writer) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, fx: ["--input", str(write(tmp, fx)), "--output-prefix",
                            str(tmp / "out" / "o"), "--tokenizer", str(fx["tokenizer"]),
                            "--no-progress"]


TOKENIZE_OUTPUTS = ("out",)  # the folder the output prefix would have created, too

ROWS: list[BadInput] = [
    row
    for case, write, message, doc in LINE_CASES
    for row in (BadInput("train-tokenizer", case, _train_tokenizer(write), message, ("tok",), doc),
                BadInput("tokenize", case, _tokenize(write), message, TOKENIZE_OUTPUTS, doc))
]
_blank = _file("blank.jsonl", lambda fx: b"\n\n")
ROWS += [
    BadInput("train-tokenizer", "only blank lines", _train_tokenizer(_blank),
             r"{tmp}/blank\.jsonl: no documents with a non-empty 'text'", ("tok",),
             "…/blank.jsonl: no documents with a non-empty 'text'"),
    BadInput("tokenize", "only blank lines", _tokenize(_blank),
             r"{tmp}/blank\.jsonl: no documents to tokenize", TOKENIZE_OUTPUTS,
             "…/blank.jsonl: no documents to tokenize"),
]


def _copy_dataset(tmp: Path, fx: dict, manifest: bool) -> Path:
    """The fixture dataset's .bin/.idx in tmp, with its tokenize manifest (`<p>.manifest.json`
    for `<p>_text_document`) or without (as a dataset made elsewhere)."""
    src = Path(fx["dataset"])
    for suffix in (".bin", ".idx"):
        shutil.copyfile(f"{src}{suffix}", tmp / f"{src.name}{suffix}")
    if manifest:
        name = src.name.removesuffix("_text_document") + ".manifest.json"
        shutil.copyfile(src.with_name(name), tmp / name)
    return tmp / src.name


def _halve_sequence_count(prefix: Path) -> None:
    idx = Path(f"{prefix}.idx")
    data = idx.read_bytes()
    magic, version, code, n_seq, n_doc = HEADER.unpack(data[:HEADER.size])
    idx.write_bytes(HEADER.pack(magic, version, code, n_seq // 2, n_doc) + data[HEADER.size:])


def _truncate_bin(prefix: Path) -> None:
    path = Path(f"{prefix}.bin")
    path.write_bytes(path.read_bytes()[:-64])


def _flip_bit_in_bin(prefix: Path) -> None:
    path = Path(f"{prefix}.bin")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _bad_dataset(corrupt: Callable[[Path], None], manifest: bool) -> Writer:
    def write(tmp: Path, fx: dict) -> Path:
        prefix = _copy_dataset(tmp, fx, manifest)
        corrupt(prefix)
        return prefix
    return write


def _merge(write: Writer) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, fx: ["--input", str(write(tmp, fx)),
                            "--output-prefix", str(tmp / "out" / "merged")]


TINY_MODEL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
              "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 128}


def _pretrain(write: Writer) -> Callable[[Path, dict], list[str]]:
    def argv(tmp: Path, fx: dict) -> list[str]:
        spec = {"model": TINY_MODEL,
                "data": {"blend": [str(write(tmp, fx))], "split": "95,5,0", "seq_length": 32},
                "checkpoint": {"save": str(tmp / "ckpt"), "interval": 10},
                "iters": 2, "micro_batch_size": 2, "global_batch_size": 4, "precision": "fp32",
                "device": "cpu"}
        (tmp / "pretrain.yaml").write_text(yaml.safe_dump(spec))
        return ["--config", str(tmp / "pretrain.yaml")]
    return argv


DATASET_CASES: list[tuple[str, Writer, str, str]] = [
    ("sequence count in the .idx header halved", _bad_dataset(_halve_sequence_count, True),
     r"{tmp}/stories_text_document\.idx: header says \d+ sequences, but the file holds \d+",
     "…/stories_text_document.idx: header says 300 sequences, but the file holds 600"),
    ("truncated .bin (dataset without a manifest)", _bad_dataset(_truncate_bin, False),
     r"{tmp}/stories_text_document\.bin: truncated \(\d+ bytes, its index needs \d+\)",
     "…/stories_text_document.bin: truncated (112506 bytes, its index needs 112570)"),
    ("a flipped bit in a .bin that has a manifest", _bad_dataset(_flip_bit_in_bin, True),
     r"{tmp}/stories_text_document\.bin: checksum mismatch \(sha256 [0-9a-f]+…, recorded "
     r"[0-9a-f]+…\): the file is corrupt",
     "…/stories_text_document.bin: checksum mismatch (sha256 bce7259b9c2f0e90…, recorded "
     "a6c2d51f461e5a6d…): the file is corrupt"),
]

ROWS += [
    row
    for case, write, message, doc in DATASET_CASES
    for row in (BadInput("merge", case, _merge(write), message, ("out",), doc),
                BadInput("pretrain", case, _pretrain(write), message, ("ckpt",), doc))
]
