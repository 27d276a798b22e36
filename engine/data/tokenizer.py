"""Tokenizers the data stages accept: a SentencePiece `.model`, a HF `tokenizer.json`, or a HF
tokenizer folder holding either. All expose the same small interface and an identity (file hash,
vocabulary size, BOS/EOD ids) that goes into manifests, so datasets built with different
tokenizers are never merged by mistake.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.errors import InputError

_CACHE_LIMIT = 1 << 20
Segments = tuple[list[str], np.ndarray, np.ndarray]  # keys, token counts, their tokens end to end


class Tokenizer:
    """Common interface: `encode(texts)` gives token ids without special tokens."""

    kind: str
    path: Path
    vocab_size: int
    bos_id: int | None
    eod_id: int | None

    def encode(self, texts: Sequence[str]) -> list[Sequence[int]]:
        raise NotImplementedError

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated, and each text's count: the form dataset writers want."""
        docs = self.encode(texts)
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64,
                             count=int(lengths.sum()))
        return tokens, lengths

    def new_segments(self) -> Segments | None:
        """What this tokenizer learned since the last call, for `add_segments` in another
        process that encodes the same corpus (None: nothing to share)."""
        return None

    def add_segments(self, segments: Segments) -> None:
        """Take in what another process's `new_segments` gave."""

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def identity(self) -> dict:
        return {"kind": self.kind, "file": self.path.name, "sha256": self.sha256,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eod_id": self.eod_id}


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece, with an exact word cache for BPE models.

    A BPE model trained with whitespace splitting has no piece in which a non-space character is
    followed by '▁', so no merge crosses the start of a run of spaces: the encoding of a text is the
    concatenation of the encodings of its segments (a run of spaces plus the word after it). Each
    distinct segment is encoded once and cached. Models for which that argument does not hold
    (another normalizer, unigram, whitespace as suffix) are encoded text by text, unchanged.
    tests/test_tokenize.py checks the cache against plain SentencePiece on real text.
    """

    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise InputError(f"{path}: not a SentencePiece model ({exc})") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eod_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.cached = self._segments_are_independent()
        self._table = _SegmentTable()

    def _segments_are_independent(self) -> bool:
        try:
            from sentencepiece import sentencepiece_model_pb2 as pb
        except ImportError:  # protobuf missing: stay exact, encode text by text
            return False
        proto = pb.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        norm, trainer = proto.normalizer_spec, proto.trainer_spec
        if (norm.name != "identity" or not norm.escape_whitespaces
                or trainer.model_type != pb.TrainerSpec.BPE or trainer.treat_whitespace_as_suffix):
            return False
        return not any("▁" in p.piece.lstrip("▁") for p in proto.pieces)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def encode(self, texts: Sequence[str]) -> list[Sequence[int]]:
        if not self.cached:
            return self.sp.encode(list(texts))
        tokens, lengths = self.encode_flat(texts)
        return [a.tolist() for a in np.split(tokens, np.cumsum(lengths)[:-1])] if len(texts) else []

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Split every text into cache keys (what SentencePiece is asked to encode: a segment
        without the one space that the dummy prefix stands for), encode the keys not seen yet in
        one call, then gather all tokens with numpy."""
        if not self.cached:
            return super().encode_flat(texts)
        keys: list[str] = []
        counts = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            parts = text.split(" ")
            if "" in parts:
                parts = _merge_space_runs(parts, text)
            keys += parts
            counts[i] = len(parts)
        table = self._table
        try:
            ids = np.fromiter(map(table.index.get, keys), dtype=np.int64, count=len(keys))
        except TypeError:  # a key not seen yet (get gave None)
            if len(table.index) > _CACHE_LIMIT:  # bound memory: start afresh
                table.clear()
            misses = [k for k in dict.fromkeys(keys) if k not in table.index]
            encodings = self.sp.encode(misses)
            lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(misses))
            table.add(misses, lengths, np.fromiter(itertools.chain.from_iterable(encodings),
                                                   dtype=np.int32, count=int(lengths.sum())))
            ids = np.fromiter(map(table.index.__getitem__, keys), dtype=np.int64, count=len(keys))
        return table.gather(ids, counts)

    def new_segments(self) -> Segments | None:
        return self._table.take_new() if self.cached else None

    def add_segments(self, segments: Segments) -> None:
        if self.cached:
            self._table.merge(segments)


def _merge_space_runs(parts: list[str], text: str) -> list[str]:
    """`text.split(" ")` -> cache keys where the text has runs of spaces: k spaces between two
    words leave k - 1 empty parts, which become the spaces of the next key; leading spaces stay
    whole in the first key and trailing spaces join the last one (as SentencePiece sees them).
    Jumps from empty part to empty part, copying the words between them in bulk."""
    keys: list[str] = []
    start, pad, n = 0, 0, len(parts)
    while True:
        try:
            i = parts.index("", start)
        except ValueError:
            i = n
        if i > start:
            if pad:
                keys.append(" " * pad + parts[start])
                start, pad = start + 1, 0
            keys += parts[start:i]
        if i == n:
            break
        pad, start = pad + 1, i + 1
    if pad and keys:
        keys[-1] += " " * pad
    elif not keys and text:  # nothing but spaces
        keys.append(text)
    return keys


class _SegmentTable:
    """Distinct segments and their token ids, kept flat in numpy arrays so that a batch's tokens
    are gathered by vectorised indexing rather than per token in Python. Segments are numbered
    in the order they were added; those from `shared` on have not been handed to other
    processes yet."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.index: dict[str, int] = {}
        self.keys: list[str] = []
        self.tokens = np.empty(1 << 16, dtype=np.int32)
        self.start = np.empty(1 << 14, dtype=np.int64)
        self.length = np.empty(1 << 14, dtype=np.int64)
        self.used = self.shared = 0

    def add(self, keys: list[str], lengths: np.ndarray, tokens: np.ndarray) -> None:
        n, m, total = len(self.keys), len(keys), len(tokens)
        self.tokens = _ensure(self.tokens, self.used + total)
        self.start, self.length = _ensure(self.start, n + m), _ensure(self.length, n + m)
        self.tokens[self.used:self.used + total] = tokens
        self.start[n:n + m] = self.used + np.cumsum(lengths) - lengths
        self.length[n:n + m] = lengths
        self.used += total
        self.keys += keys
        self.index.update(zip(keys, range(n, n + m)))

    def take_new(self) -> Segments:
        """The segments added since the last call."""
        a, b = self.shared, len(self.keys)
        self.shared = b
        t0 = self.start[a] if b > a else 0
        return self.keys[a:b], self.length[a:b].copy(), self.tokens[t0:self.used].copy()

    def merge(self, segments: Segments) -> None:
        """Add another process's segments that are not here yet (they count as shared)."""
        keys, lengths, tokens = segments
        new = np.fromiter((k not in self.index for k in keys), dtype=bool, count=len(keys))
        caught_up = self.shared == len(self.keys)
        if not new.all():
            keys = [k for k, keep in zip(keys, new) if keep]
            tokens, lengths = tokens[np.repeat(new, lengths)], lengths[new]
        self.add(keys, lengths, tokens)
        if caught_up:
            self.shared = len(self.keys)

    def gather(self, ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of the segments `ids`, concatenated, and tokens per text (`counts` segments each)."""
        lengths = self.length[ids]
        ends = np.cumsum(lengths)
        offsets = np.repeat(self.start[ids] - (ends - lengths), lengths)
        tokens = self.tokens[offsets + np.arange(len(offsets))]
        bounds = np.concatenate(([0], ends))[np.cumsum(counts)]
        return tokens, np.diff(bounds, prepend=0)


def _ensure(a: np.ndarray, size: int) -> np.ndarray:
    """`a`, grown (doubling) to hold at least `size` items."""
    if size <= len(a):
        return a
    grown = np.empty(max(size, 2 * len(a)), dtype=a.dtype)
    grown[:len(a)] = a
    return grown


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (`tokenizer.json`); BOS/EOS from tokenizer_config.json when
    present, else from the usual special-token names."""

    kind = "hf-tokenizers"
    _BOS = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
    _EOS = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]")

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.path = path
        try:
            self.tok = RustTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise InputError(f"{path}: not a Hugging Face tokenizer.json ({exc})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        config = _read_json(path.parent / "tokenizer_config.json")
        self.bos_id = self._special(config.get("bos_token"), self._BOS)
        self.eod_id = self._special(config.get("eos_token"), self._EOS)

    def _special(self, configured, fallbacks: tuple[str, ...]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for name in ([configured] if configured else []) + list(fallbacks):
            token_id = self.tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open a tokenizer by path; errors name the path and say what was expected there."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"tokenizer {path}: no such file or directory")
    if path.is_dir():
        for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
            if (path / name).is_file():
                return cls(path / name)
        raise InputError(f"tokenizer {path}: folder has neither tokenizer.json nor tokenizer.model")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def to_array(ids: Sequence[int], dtype: np.dtype) -> np.ndarray:
    return np.fromiter(ids, dtype=dtype, count=len(ids))
