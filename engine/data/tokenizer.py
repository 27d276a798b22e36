"""Tokenizers the data stages accept: a SentencePiece `.model`, a HF `tokenizer.json`, or a HF
tokenizer folder holding either. All expose the same small interface and an identity (file hash,
vocabulary size, BOS/EOD ids) that goes into manifests, so datasets built with different
tokenizers are never merged by mistake.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.errors import InputError

# A run of spaces and the word after it; trailing spaces stay with the last word.
_SEGMENT = re.compile(r" *[^ ]+(?: +$)?| +$")
_CACHE_LIMIT = 1 << 20


class Tokenizer:
    """Common interface: `encode(texts)` gives token ids without special tokens."""

    kind: str
    path: Path
    vocab_size: int
    bos_id: int | None
    eod_id: int | None

    def encode(self, texts: Sequence[str]) -> list[Sequence[int]]:
        raise NotImplementedError

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
        self._cache: dict[str, tuple[int, ...]] = {}

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
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if re.search("[^▁]▁", piece):
                return False
        return True

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def encode(self, texts: Sequence[str]) -> list[Sequence[int]]:
        if not self.cached:
            return self.sp.encode(list(texts))
        return [self._encode_cached(text) for text in texts]

    def _encode_cached(self, text: str) -> list[int]:
        """Cache keys are what SentencePiece is asked to encode: a segment without the one space
        that the dummy prefix stands for. Ordinary text (single spaces) splits with str.split;
        runs of spaces and leading/trailing spaces take the regex."""
        keys = text.split(" ")
        head: tuple[int, ...] = ()
        if "" in keys:
            segments = _SEGMENT.findall(text)
            if text.startswith(" "):  # leading spaces meet the dummy prefix: encode as SentencePiece does
                head, segments = tuple(self.sp.encode(segments[0])), segments[1:]
            keys = [s[1:] if s[0] == " " else s for s in segments]
        cache = self._cache
        ids = [cache.get(k) for k in keys]
        if None in ids:
            if len(cache) > _CACHE_LIMIT:
                cache.clear()
            misses = list({k for k, v in zip(keys, ids) if v is None})
            cache.update(zip(misses, map(tuple, self.sp.encode(misses))))
            ids = [cache[k] for k in keys]
        return list(itertools.chain(head, *ids))


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
