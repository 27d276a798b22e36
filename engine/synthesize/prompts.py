"""Prompts: a document's first `prefix_tokens` tokens in the teacher's tokenizer, and the text
they decode to (the row's prefix). Empty documents (whitespace only) are skipped; shorter ones are
skipped or used whole, as the spec says; both are counted."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

from engine.data.tokenizer import Tokenizer
from engine.synthesize.documents import Document

# A document is encoded from a cut of its text, not whole (documents run to megabytes): a cut
# long enough to give this many tokens past the prefix, whose first tokens no longer depend on
# where the cut fell (a tokenizer merges across the cut only near it).
_MARGIN_TOKENS = 16
_CHARS_PER_TOKEN = 8


@dataclass(frozen=True)
class Prompt:
    document: Document
    prefix_ids: list[int]  # without BOS
    prefix: str
    seed: int


def make_prompts(documents: list[Document], tok: Tokenizer, prefix_tokens: int,
                 keep_short: bool, seed: int) -> tuple[list[Prompt], Counter]:
    """The prompts of `documents` and counts of those skipped (empty_documents,
    short_documents) or kept whole (short_documents_whole)."""
    counts: Counter = Counter()
    prompts = []
    for doc, ids in zip(documents, _leading_tokens(documents, tok, prefix_tokens)):
        if not doc.text.strip():
            counts["empty_documents"] += 1
            continue
        if len(ids) < prefix_tokens:
            counts["short_documents_whole" if keep_short else "short_documents"] += 1
            if not keep_short:
                continue
        ids = ids[:prefix_tokens]
        prompts.append(Prompt(doc, ids, tok.decode(ids), prompt_seed(seed, doc.index)))
    return prompts, counts


def _leading_tokens(documents: list[Document], tok: Tokenizer, n: int) -> list[list[int]]:
    """At least the first n + margin tokens of each document (all of a shorter one)."""
    limit = (n + _MARGIN_TOKENS) * _CHARS_PER_TOKEN
    out = [list(ids) for ids in tok.encode([d.text[:limit] for d in documents])]
    # a cut that gave too few tokens (long tokens), where the text goes on: encode it whole
    again = [i for i, d in enumerate(documents)
             if len(d.text) > limit and len(out[i]) < n + _MARGIN_TOKENS]
    for i, ids in zip(again, tok.encode([documents[i].text for i in again])):
        out[i] = list(ids)
    return out


def prompt_seed(seed: int, index: int) -> int:
    """The document's own seed (63 bits): its completions depend on nothing else."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
