"""Megatron's indexed token dataset (`<prefix>.bin` + `<prefix>.idx`), byte for byte.

`.idx`: magic `MMIDIDX\\x00\\x00`, u64 version 1, u8 dtype code, u64 sequence count, u64 document
count (documents + 1), int32 sequence lengths, int64 byte pointers, int64 document indices.
`.bin`: the tokens of every sequence, back to back. One sequence per document here (Megatron's
tools write one unless sentences are split); datasets with several sequences per document load too.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np

from engine.errors import InputError
from engine.lineage import artifact_manifest
from engine.manifest import check_files

log = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                                6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
HEADER = struct.Struct("<9sQBQQ")


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: u16 when the vocabulary fits below 65500, else i32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def data_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def index_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def write_index(f: BinaryIO, dtype: np.dtype, sequence_lengths: np.ndarray,
                document_indices: np.ndarray) -> None:
    """Write a complete `.idx` for sequences stored back to back in that order."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    docs = np.asarray(document_indices, dtype=np.int64)
    f.write(HEADER.pack(MAGIC, VERSION, CODE_OF[np.dtype(dtype)], len(lengths), len(docs)))
    f.write(lengths.tobytes(order="C"))
    f.write(pointers.tobytes(order="C"))
    f.write(docs.tobytes(order="C"))


class IndexedDatasetWriter:
    """Streams documents into an open `.bin`; `finish()` writes the `.idx`.

    Memory grows with the number of documents (12 bytes each), never with the number of tokens.
    The sha256 of the `.bin` is computed on the way, so the manifest needs no second read.
    """

    def __init__(self, bin_file: BinaryIO, dtype: np.dtype) -> None:
        self.f = bin_file
        self.dtype = np.dtype(dtype)
        self._lengths: list[np.ndarray] = []
        self.documents = 0
        self.tokens = 0
        self.sha256 = hashlib.sha256()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths (one sequence each)."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self.f.write(data)
        self.sha256.update(data)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += int(np.sum(lengths, dtype=np.int64))

    def finish(self, idx_file: BinaryIO) -> None:
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        write_index(idx_file, self.dtype, lengths, np.arange(len(lengths) + 1, dtype=np.int64))


class IndexedDataset:
    """Read-only, memory-mapped view of a Megatron indexed dataset; `ds[i]` is sequence i.

    Opening checks the structure (an InputError saying what is wrong otherwise) and, for a
    dataset with a manifest, the checksums of its two files: nothing reads a corrupt dataset.
    `verify=False` skips the checksums where another process has just checked them.
    """

    def __init__(self, prefix: str | Path, verify: bool = True) -> None:
        self.prefix = str(prefix)
        idx, bin_ = index_path(prefix), data_path(prefix)
        for p in (idx, bin_):
            if not p.is_file():
                raise InputError(f"{p}: no such file (expected a Megatron dataset '{prefix}')")
        self.dtype, n_seq, n_doc = _read_header(idx)
        index = np.memmap(idx, mode="r", dtype=np.uint8)
        off = HEADER.size
        self.sequence_lengths = index[off:off + n_seq * 4].view(np.int32)
        off += n_seq * 4
        self.sequence_pointers = index[off:off + n_seq * 8].view(np.int64)
        off += n_seq * 8
        self.document_indices = index[off:off + n_doc * 8].view(np.int64)
        expected = _check_arrays(idx, self.sequence_lengths, self.sequence_pointers,
                                 self.document_indices, self.dtype.itemsize)
        bin_size = bin_.stat().st_size
        if bin_size < expected:
            raise InputError(f"{bin_}: truncated ({bin_size} bytes, its index needs {expected})")
        if bin_size > expected:
            raise InputError(f"{bin_}: {bin_size} bytes, but its index accounts for {expected}: "
                             f"the .bin and .idx do not belong together")
        if verify:
            _verify_checksums(prefix)
        self.tokens = (np.memmap(bin_, mode="r", dtype=self.dtype) if bin_size
                       else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence i from `offset`, `length` of them (all remaining when None)."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sequence_lengths[i]) - offset if length is None else length
        return self.tokens[start:start + n]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def _read_header(idx: Path) -> tuple[np.dtype, int, int]:
    """Token dtype, sequence count and document index count of an `.idx` whose size is what its
    header says."""
    with open(idx, "rb") as f:
        head = f.read(HEADER.size)
    if head[:9] != MAGIC:
        raise InputError(f"{idx}: not a Megatron .idx file (bad magic)")
    if len(head) < HEADER.size:
        raise InputError(f"{idx}: truncated ({len(head)} bytes, the header alone is {HEADER.size})")
    _, version, code, n_seq, n_doc = HEADER.unpack(head)
    if version != VERSION:
        raise InputError(f"{idx}: unsupported .idx version {version} (expected {VERSION})")
    if code not in DTYPE_CODES:
        raise InputError(f"{idx}: unknown dtype code {code}")
    body = idx.stat().st_size - HEADER.size
    arrays = n_seq * (4 + 8) + n_doc * 8
    # Megatron's multimodal datasets append one int8 mode per sequence; they load too.
    if body not in (arrays, arrays + n_seq):
        held = (body - n_doc * 8) / 12
        if held >= 0 and held.is_integer():
            raise InputError(f"{idx}: header says {n_seq} sequences, but the file holds "
                             f"{int(held)}")
        raise InputError(f"{idx}: {HEADER.size + body} bytes, but its header ({n_seq} sequences, "
                         f"{n_doc} document indices) needs {HEADER.size + arrays}: truncated or "
                         f"corrupt")
    return np.dtype(DTYPE_CODES[code]), n_seq, n_doc


_CHUNK = 1 << 22  # sequences checked at a time: memory stays bounded whatever the index size


def _check_arrays(idx: Path, lengths: np.ndarray, pointers: np.ndarray, docs: np.ndarray,
                  itemsize: int) -> int:
    """Lengths >= 0, each pointer the byte offset where the sequences before it end (Megatron
    stores them back to back), document indices rising from 0 to the sequence count; returns the
    bytes the `.bin` must hold."""
    end = 0
    for start in range(0, len(lengths), _CHUNK):
        part = lengths[start:start + _CHUNK].astype(np.int64)
        if part.min() < 0:
            i = start + int(np.argmax(part < 0))
            raise InputError(f"{idx}: sequence {i} has a negative length ({lengths[i]})")
        ends = end + np.cumsum(part) * itemsize
        starts = np.concatenate(([end], ends[:-1]))
        wrong = np.flatnonzero(pointers[start:start + len(part)] != starts)
        if len(wrong):
            i = start + int(wrong[0])
            raise InputError(f"{idx}: sequence {i} starts at byte {pointers[i]}, but the lengths "
                             f"before it end at byte {starts[wrong[0]]}")
        end = int(ends[-1])
    if len(docs) == 0:
        raise InputError(f"{idx}: no document indices (even an empty dataset has one, 0)")
    if docs[0] != 0 or docs[-1] != len(lengths):
        raise InputError(f"{idx}: document indices must run from 0 to the sequence count "
                         f"{len(lengths)}, they run from {docs[0]} to {docs[-1]}")
    if np.any(docs[1:] < docs[:-1]):
        i = 1 + int(np.argmax(docs[1:] < docs[:-1]))
        raise InputError(f"{idx}: document index {i} ({docs[i]}) is below the one before it "
                         f"({docs[i - 1]})")
    return end


def _verify_checksums(prefix: str | Path) -> None:
    """A dataset that a stage wrote (tokenize, merge) is read only if its `.bin` and `.idx` are
    the bytes its manifest records: a flipped bit fails here, naming the file, not in training.
    Only this prefix's two files: the manifest may list other keys' datasets."""
    manifest = artifact_manifest(prefix)
    if manifest is None:
        return
    names = (data_path(prefix).name, index_path(prefix).name)
    files = {name: manifest.files[name] for name in names if name in manifest.files}
    t0 = time.perf_counter()
    check_files(Path(prefix).parent, files)
    log.info("%s: checksums of %.1f MB verified in %.2fs", prefix,
             sum(e.bytes for e in files.values()) / 2**20, time.perf_counter() - t0)
