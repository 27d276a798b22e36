"""tokenize: JSONL documents -> Megatron indexed datasets (`<prefix>_<key>_document.bin/.idx`).

Streams its input: lines are read in batches, encoded by a pool of worker processes (in order, with
a bounded number of batches in flight, so memory stays flat whatever the corpus size) and appended
to the output files, which carry temporary names until the whole run has succeeded.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import glob
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, BinaryIO, Iterator

import numpy as np
from pydantic import AfterValidator, AliasChoices, Field, field_validator
from pydantic_settings import CliVariadicArg
from tqdm import tqdm

from engine.atomic import StagedFiles
from engine.data.indexed import IndexedDatasetWriter, token_dtype
from engine.data.tokenizer import Segments, Tokenizer, load_tokenizer
from engine.errors import InputError
from engine.manifest import (FileEntry, Manifest, dataset_prefix, fingerprint, sha256_file,
                             write_manifest)
from engine.signals import StopSignals
from engine.spec import StageSpec

log = logging.getLogger(__name__)
_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_NOT_OUTPUT = {"affects_output": False}
_INPUT = {"input": True}


class Spec(StageSpec):
    """Tokenize JSONL documents into Megatron indexed datasets
    (<prefix>_<key>_document.bin/.idx), streaming, with a pool of workers. Flags follow
    Megatron-LM's tools/preprocess_data.py where they overlap."""

    input: CliVariadicArg[list[str]] = Field(description="JSONL files (.jsonl, .jsonl.gz), folders "
                                             "or globs", json_schema_extra=_INPUT)
    output_prefix: Annotated[str, AfterValidator(dataset_prefix)] = Field(
        description="writes <prefix>_<key>_document.bin/.idx", json_schema_extra=_NOT_OUTPUT)
    tokenizer: str = Field(description="SentencePiece .model, HF tokenizer.json, or HF folder",
                           validation_alias=AliasChoices("tokenizer", "tokenizer_model"),
                           json_schema_extra=_INPUT)
    json_keys: CliVariadicArg[list[str]] = Field(
        default=["text"], min_length=1, description="JSON fields to tokenize, one dataset each")
    append_eod: bool = Field(default=False, description="append the tokenizer's EOD to each document")
    add_bos: bool = Field(default=False, description="prepend the tokenizer's BOS to each document")
    workers: int = Field(default=1, ge=1, le=512, description="encoding processes",
                         json_schema_extra=_NOT_OUTPUT)
    batch_lines: int = Field(default=2048, ge=1, description="most lines per unit of work",
                             json_schema_extra=_NOT_OUTPUT)
    batch_bytes: int = Field(default=1 << 20, ge=1,
                             description="bytes read per unit of work (cut at a line end)",
                             json_schema_extra=_NOT_OUTPUT)
    skip_bad_lines: bool = Field(default=False,
                                 description="skip and count malformed lines instead of failing")
    progress: bool = Field(default=True, description="show a progress bar",
                           json_schema_extra=_NOT_OUTPUT)

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one input is needed")
        return v


def input_paths(spec: Spec) -> dict[str, Path]:
    """The stage's inputs by name (see engine.lineage): each corpus file and the tokenizer file."""
    paths: dict[str, Path] = {f"input[{i}]": p for i, p in enumerate(resolve_inputs(spec.input))}
    paths["tokenizer"] = load_tokenizer(spec.tokenizer).path
    return paths


def output_files(prefix: str, key: str) -> tuple[Path, Path]:
    base = f"{prefix}_{key}_document"
    return Path(base + ".bin"), Path(base + ".idx")


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Files, folders (their JSONL files, sorted) and globs -> an ordered list of readable files."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_SUFFIXES)
                           and not p.name.endswith("manifest.json"))
            if not found:
                raise InputError(f"{path}: folder has no {', '.join(_SUFFIXES)} files")
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
            if not found:
                raise InputError(f"{pattern}: no such file, folder or matching files")
        files.extend(found)
    for f in files:
        if not os.access(f, os.R_OK):
            raise InputError(f"{f}: not readable")
        if f.stat().st_size == 0:
            raise InputError(f"{f}: empty file")
    return files


class _HashingReader:
    """File wrapper that hashes the raw bytes as they are read (through gzip or not)."""

    def __init__(self, f: BinaryIO, h) -> None:
        self.f, self.h = f, h

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data


def _read_batches(files: list[Path], batch_lines: int, batch_bytes: int,
                  hashes: dict[str, "hashlib._Hash"]) -> Iterator[tuple[int, int, bytes]]:
    """(file index, first line number, whole lines as one bytes object) in input order; fills
    `hashes` with each raw file's sha256. Reads blocks, not lines: the main process stays light,
    and the workers split lines."""
    for fi, path in enumerate(files):
        h = hashes[str(path)] = hashlib.sha256()
        with open(path, "rb") as raw:
            reader = _HashingReader(raw, h)
            stream = gzip.GzipFile(fileobj=reader, mode="rb") if path.name.endswith(".gz") else reader
            line, rest = 1, b""
            try:
                while chunk := stream.read(batch_bytes):
                    data = rest + chunk if rest else chunk
                    end = data.rfind(b"\n") + 1  # 0 while one line is longer than a block
                    rest = data[end:]
                    for piece in _at_most_lines(data[:end], batch_lines):
                        yield fi, line, piece
                        line += piece.count(b"\n")
            except (OSError, EOFError) as exc:  # a corrupt .gz
                raise InputError(f"{path}: cannot read: {exc}") from None
            if rest:
                yield fi, line, rest
            h.update(raw.read())  # bytes after the last complete gzip member


def _at_most_lines(data: bytes, n: int) -> Iterator[bytes]:
    """`data` (whole lines) in pieces of at most n lines."""
    start = 0
    while start < len(data):
        end = start
        for _ in range(n):
            end = data.find(b"\n", end) + 1
            if end == 0:
                end = len(data)
                break
        yield data[start:end]
        start = end


@dataclass
class _Batch:
    """What a worker returns for one batch of lines."""
    tokens: dict[str, np.ndarray] = field(default_factory=dict)
    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    bad: list[tuple[int, str]] = field(default_factory=list)
    empty: int = 0
    learned: Segments | None = None  # the tokenizer's new cache entries, for the other workers


_worker: dict = {}


def _set_worker(tok: Tokenizer, keys: list[str], add_bos: bool, append_eod: bool,
                share: bool = True) -> None:
    _worker.update(tok=tok, keys=keys, dtype=token_dtype(tok.vocab_size), share=share,
                   bos=[tok.bos_id] if add_bos else [], eod=[tok.eod_id] if append_eod else [])


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up


def _spawned_worker(tokenizer_path: str, keys: list[str], add_bos: bool, append_eod: bool) -> None:
    _ignore_sigint()
    _set_worker(load_tokenizer(tokenizer_path), keys, add_bos, append_eod)


def parse_line(line: bytes, keys: list[str]) -> list[str] | str:
    """The texts of one JSONL line, or the reason it is malformed."""
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:  # one message ends "starting at" (the column follows)
        return f"malformed JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    texts = []
    for key in keys:
        if key not in obj:
            return f"missing key {key!r}"
        if not isinstance(obj[key], str):
            return f"key {key!r} is {type(obj[key]).__name__}, not a string"
        texts.append(obj[key])
    return texts


def parse_lines(first_line: int, data: bytes, keys: list[str]
                ) -> tuple[list[list[str]], list[tuple[int, str]]]:
    """The texts of each line of `data` (numbered from `first_line`), and the (line number,
    reason) of each malformed one. Blank lines (a trailing newline) are not documents."""
    rows: list[list[str]] = []
    bad: list[tuple[int, str]] = []
    for n, line in enumerate(data.split(b"\n"), first_line):
        if line.strip():
            parsed = parse_line(line, keys)
            if isinstance(parsed, str):
                bad.append((n, parsed))
            else:
                rows.append(parsed)
    return rows, bad


def bad_line(path: Path, line: int, reason: str) -> str:
    """How every stage that reads JSONL names a malformed line."""
    return f"{path}:{line}: {reason}"


def documents(files: list[Path], keys: list[str]) -> Iterator[list[str]]:
    """The texts of every line of `files`, in order, for a stage that reads them in one process;
    the first malformed line is an InputError naming file and line."""
    for fi, first, data in _read_batches(files, 2048, 1 << 20, {}):
        rows, bad = parse_lines(first, data, keys)
        if bad:
            raise InputError(bad_line(files[fi], *bad[0]))
        yield from rows


def _encode_batch(first_line: int, data: bytes, shared: list[Segments] = ()) -> _Batch:
    tok: Tokenizer = _worker["tok"]
    for segments in shared:
        tok.add_segments(segments)
    keys, bos, eod, dtype = _worker["keys"], _worker["bos"], _worker["eod"], _worker["dtype"]
    parsed, bad = parse_lines(first_line, data, keys)
    rows = [r for r in parsed if any(r)]
    out = _Batch(bad=bad, empty=len(parsed) - len(rows))
    for k, key in enumerate(keys):
        tokens, lengths = tok.encode_flat([r[k] for r in rows])
        out.tokens[key], out.lengths[key] = _with_specials(tokens, lengths[lengths > 0], bos, eod, dtype)
    if _worker["share"]:
        out.learned = tok.new_segments()
    return out


def _with_specials(tokens: np.ndarray, lengths: np.ndarray, bos: list[int], eod: list[int],
                   dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Documents laid end to end with BOS before and EOD after each: (tokens, lengths)."""
    extra = len(bos) + len(eod)
    lengths = (lengths + extra).astype(np.int32)
    if not extra:
        return tokens.astype(dtype), lengths
    out = np.empty(int(lengths.sum(dtype=np.int64)), dtype=dtype)
    ends = np.cumsum(lengths, dtype=np.int64)
    shift = np.repeat(np.arange(len(lengths), dtype=np.int64) * extra + len(bos), lengths - extra)
    out[np.arange(len(tokens)) + shift] = tokens
    if bos:
        out[ends - lengths] = bos[0]
    if eod:
        out[ends - 1] = eod[0]
    return out, lengths


def _results(spec: Spec, tok: Tokenizer, files: list[Path], hashes: dict
             ) -> Iterator[tuple[int, int, _Batch]]:
    """Encoded batches in input order: inline for one worker, else a process pool with at most
    2 batches per worker in flight. Where fork exists the workers inherit the loaded tokenizer
    (starting one costs milliseconds instead of a second of imports). What a worker's tokenizer
    learns (new cache entries) rides along with the next `workers` batches submitted, so that
    every worker does not have to learn the whole vocabulary of segments by itself."""
    batches = _read_batches(files, spec.batch_lines, spec.batch_bytes, hashes)
    _set_worker(tok, spec.json_keys, spec.add_bos, spec.append_eod, share=spec.workers > 1)
    if spec.workers == 1:
        for fi, first, data in batches:
            yield fi, first, _encode_batch(first, data)
        return
    if "fork" in multiprocessing.get_all_start_methods() and sys.platform == "linux":
        ctx, init, args = multiprocessing.get_context("fork"), _ignore_sigint, ()
    else:
        ctx, init = multiprocessing.get_context("spawn"), _spawned_worker
        args = (spec.tokenizer, spec.json_keys, spec.add_bos, spec.append_eod)
    pool = cf.ProcessPoolExecutor(spec.workers, mp_context=ctx, initializer=init, initargs=args)
    pending: collections.deque = collections.deque()
    learned: collections.deque = collections.deque(maxlen=spec.workers)

    def done() -> tuple[int, int, _Batch]:
        fi0, first0, fut = pending.popleft()
        batch = fut.result()
        if batch.learned is not None and batch.learned[0]:
            learned.append(batch.learned)
        batch.learned = None
        return fi0, first0, batch

    try:
        for fi, first, data in batches:
            pending.append((fi, first, pool.submit(_encode_batch, first, data, list(learned))))
            while len(pending) >= 2 * spec.workers:
                yield done()
        while pending:
            yield done()
    finally:
        pool.shutdown(wait=not pending, cancel_futures=True)


def run(spec: Spec) -> Manifest:
    files = resolve_inputs(spec.input)
    tok = load_tokenizer(spec.tokenizer)
    if spec.add_bos and tok.bos_id is None:
        raise InputError(f"{tok.path}: --add-bos, but the tokenizer has no BOS token")
    if spec.append_eod and tok.eod_id is None:
        raise InputError(f"{tok.path}: --append-eod, but the tokenizer has no EOS/EOD token")
    dtype = token_dtype(tok.vocab_size)
    log.info("tokenize %d file(s) with %s (vocab %d, %s tokens), keys %s, %d worker(s)",
             len(files), tok.path, tok.vocab_size, dtype.name, spec.json_keys, spec.workers)

    hashes: dict = {}
    skipped: list[str] = []
    empty = 0
    start = time.perf_counter()
    with StopSignals(signal.SIGINT, signal.SIGTERM) as stop, StagedFiles() as staged, \
            tqdm(unit="doc", disable=not spec.progress, mininterval=1.0, smoothing=0.1) as bar:
        writers, idx_tmp = {}, {}
        for key in spec.json_keys:
            bin_path, idx_path = output_files(spec.output_prefix, key)
            writers[key] = IndexedDatasetWriter(open(staged.stage(bin_path), "wb"), dtype)
            idx_tmp[key] = staged.stage(idx_path)
        try:
            for fi, _first, batch in _results(spec, tok, files, hashes):
                if stop.received is not None:
                    raise stop.as_exception()
                for line, reason in batch.bad:
                    where = bad_line(files[fi], line, reason)
                    if not spec.skip_bad_lines:
                        raise InputError(where)
                    if len(skipped) < 20:
                        log.warning("skipped %s", where)
                    skipped.append(where)
                empty += batch.empty
                for key, w in writers.items():
                    w.add_documents(batch.tokens[key], batch.lengths[key])
                w0 = writers[spec.json_keys[0]]
                bar.update(len(batch.lengths[spec.json_keys[0]]))
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{w0.tokens / elapsed:,.0f} tok/s", refresh=False)
        finally:
            for w in writers.values():
                w.f.close()
        if stop.received is not None:
            raise stop.as_exception()
        if writers[spec.json_keys[0]].documents == 0:
            raise InputError(f"{', '.join(map(str, files))}: no documents to tokenize")
        for key, w in writers.items():
            with open(idx_tmp[key], "wb") as f:
                w.finish(f)
        staged.commit()
    elapsed = time.perf_counter() - start

    out_files: dict[str, FileEntry] = {}
    per_key = {}
    for key, w in writers.items():
        bin_path, idx_path = output_files(spec.output_prefix, key)
        out_files[bin_path.name] = FileEntry(sha256=w.sha256.hexdigest(), bytes=bin_path.stat().st_size)
        out_files[idx_path.name] = sha256_file(idx_path)
        per_key[key] = {"documents": w.documents, "tokens": w.tokens}
    # the raw files' sha256, computed while reading: what engine.lineage computes before a run
    inputs = {f"input[{i}]": hashes[str(p)].hexdigest() for i, p in enumerate(files)}
    identity = tok.identity()
    inputs["tokenizer"] = identity["sha256"]
    first = per_key[spec.json_keys[0]]
    summary = {"documents": first["documents"], "tokens": first["tokens"], "keys": per_key,
               "skipped_lines": len(skipped), "empty_documents": empty,
               "dtype": dtype.name, "tokenizer": identity, "seconds": round(elapsed, 3),
               "tokens_per_second": round(first["tokens"] / max(elapsed, 1e-9))}
    if skipped:
        summary["skipped_examples"] = skipped[:20]
    manifest = Manifest(
        kind="dataset", stage="tokenize", spec=spec.model_dump(mode="json"), inputs=inputs,
        fingerprint=fingerprint("tokenize", spec.fingerprint_fields(), inputs),
        summary=summary, files=out_files)
    write_manifest(spec.output_prefix, manifest)
    log.info("wrote %d documents, %d tokens in %.1fs (%s skipped lines, %d empty documents)",
             first["documents"], first["tokens"], elapsed, len(skipped), empty)
    return manifest
