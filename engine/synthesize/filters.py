"""Filters over the generated rows, in the spec's order (engine.synthesize.spec.Filters): a row is
counted under the first check it fails. The duplicate checks remember what was kept, so a row is
compared with the rows before it: the first of several duplicates stays, and the order is the
corpus's, the same whatever ranks generated the shards."""

from __future__ import annotations

import hashlib
from collections import Counter

from datasketch import MinHash, MinHashLSH

from engine.synthesize.spec import Filters

_MINHASH_SEED = 1  # fixed: a resumed or re-filtered run sees the same signatures


def repeated_ngram_ratio(text: str, n: int) -> float:
    """The fraction of the text's word n-grams that repeat an earlier one (0 with none)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def shingles(text: str, k: int) -> set[bytes]:
    """Word k-grams; a text of fewer words is one shingle."""
    words = text.split()
    return {" ".join(words[i:i + k]).encode() for i in range(max(len(words) - k + 1, 1))}


class RowFilter:
    """`reason(row)`: why the row is dropped, or None (then it counts as kept); `counts` by
    reason."""

    def __init__(self, filters: Filters) -> None:
        self.f = filters
        self.counts: Counter = Counter()
        self._seen: set[bytes] = set()
        self._lsh = (MinHashLSH(threshold=filters.near_threshold, num_perm=filters.num_perm)
                     if filters.near_duplicates else None)

    def reason(self, row: dict) -> str | None:
        why = self._check(row["completion"], row["completion_tokens"], row["id"])
        self.counts[why or "kept"] += 1
        return why

    def _check(self, text: str, tokens: int, key: str) -> str | None:
        f = self.f
        if f.empty and not text.strip():
            return "empty"
        if tokens < f.min_tokens:
            return "too_short"
        if f.max_tokens is not None and tokens > f.max_tokens:
            return "too_long"
        if f.max_repeated_ngrams is not None and \
                repeated_ngram_ratio(text, f.ngram) > f.max_repeated_ngrams:
            return "repeated_ngrams"
        if f.exact_duplicates:
            digest = hashlib.sha256(text.encode()).digest()
            if digest in self._seen:
                return "exact_duplicate"
            self._seen.add(digest)
        if self._lsh is not None:
            signature = MinHash(num_perm=f.num_perm, seed=_MINHASH_SEED)
            signature.update_batch(list(shingles(text, f.shingle_words)))
            if self._lsh.query(signature):
                return "near_duplicate"
            self._lsh.insert(key, signature)
        return None
