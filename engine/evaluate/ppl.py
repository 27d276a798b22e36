"""Token-level perplexity with sliding windows over independent documents.

A window of length L is L positions of the model: L + 1 tokens, the last of which is only a
target. Window w reads document tokens [w·stride, w·stride + L + 1) (cut at the document's end);
the first window scores every token it can (all but the document's first), each later one only
the tokens after the previous window's end. So every token but the first of each document is
scored exactly once, and a token scored in a later window sees at least `L - stride + 1` earlier
tokens of its document. With stride = L windows are back to back, one token carried over
(lm-evaluation-harness's and Megatron-LM's default). `align_last` gives the last window the full
L positions of context (it ends at the document's end), as lm-evaluation-harness does. Lengths
beyond the model's trained context are allowed; the model's RoPE scaling (if any) applies.

A document is a JSON Lines row, a text file (or each .txt file of a folder), or a sequence of a
Megatron indexed dataset; documents never see each other. With BOS on, each document starts with
BOS, so its first real token is scored too (predicted from BOS).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from engine.data.indexed import IndexedDataset, index_path
from engine.data.tokenizer import Tokenizer
from engine.errors import InputError
from engine.evaluate.inputs import read_jsonl, read_text
from engine.evaluate.report import document_rows
from engine.evaluate.scoring import NLL, SCORED, Request, Scorer

log = logging.getLogger(__name__)


def windows(n_tokens: int, length: int, stride: int,
            align_last: bool = False) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window over a document of n_tokens tokens: the
    window reads tokens [begin, end) and scores [first, end)."""
    if n_tokens < 2:
        return
    begin, scored_until = 0, 1
    while True:
        end = min(begin + length + 1, n_tokens)
        if end == n_tokens and align_last:
            begin = max(0, end - length - 1)
        yield begin, end, scored_until
        if end == n_tokens:
            return
        scored_until = end
        begin += stride


def window_requests(documents: list[np.ndarray], length: int, stride: int,
                    align_last: bool = False) -> list[Request]:
    return [Request(doc[begin:end], first - begin, read_last=False)
            for doc in documents
            for begin, end, first in windows(len(doc), length, stride, align_last)]


def document_nll(scorer: Scorer, documents: list[np.ndarray], length: int, stride: int,
                 align_last: bool = False, desc: str = "ppl") -> tuple[np.ndarray, int]:
    """The summed NLL of each document's tokens (all but its first), and how many windows."""
    spans = [sum(1 for _ in windows(len(doc), length, stride, align_last)) for doc in documents]
    results = scorer.score_all(window_requests(documents, length, stride, align_last), desc=desc)
    scored = int(results[:, SCORED].sum())
    expected = sum(max(len(d) - 1, 0) for d in documents)
    if scored != expected:  # the windows' contract; cheap to keep checking
        raise RuntimeError(f"{desc}: scored {scored} tokens, expected {expected}")
    owner = np.repeat(np.arange(len(documents)), spans)
    return np.bincount(owner, results[:, NLL], minlength=len(documents)), len(results)


def perplexity(nll_sum: float, count: float) -> float:
    """exp(nll_sum / count); inf where that overflows, nan for nothing scored."""
    if count <= 0:
        return float("nan")
    mean = nll_sum / count
    return math.exp(mean) if mean < 700 else float("inf")


@dataclass
class Documents:
    """A perplexity dataset: its name, where it came from, and its documents as token ids."""

    name: str
    path: str
    kind: str
    documents: list[np.ndarray]


def load_documents(path: str, get_tokenizer: Callable[[], Tokenizer], text_key: str,
                   bos_id: int | None, vocab_size: int, limit: int | None) -> Documents:
    """Read and tokenize one dataset (see the module doc for what a document is)."""
    p = Path(path)
    if index_path(path).is_file():
        ds = IndexedDataset(path)
        count = len(ds) if limit is None else min(limit, len(ds))
        docs = [np.asarray(ds[i], dtype=np.int64) for i in range(count)]
        top = max((int(d.max()) for d in docs if len(d)), default=-1)
        if top >= vocab_size:
            raise InputError(f"{path}: token id {top} is outside the model's vocabulary "
                             f"({vocab_size}); was it tokenized with another tokenizer?")
        if bos_id is not None:
            docs = [d if len(d) and d[0] == bos_id else np.concatenate(([bos_id], d)) for d in docs]
        return Documents(p.name, str(path), "indexed", docs)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.txt") if f.is_file())
        if not files:
            raise InputError(f"{p}: folder has no .txt files")
        texts, kind = [read_text(f) for f in files[:limit]], "text files"
    elif p.suffix in (".jsonl", ".json"):
        texts, kind = read_jsonl(p, text_key)[:limit], "jsonl"
    elif p.is_file():
        texts, kind = [read_text(p)], "text"
    else:
        raise InputError(f"{path}: no such file, folder or indexed dataset (.bin/.idx)")
    prefix = [bos_id] if bos_id is not None else []
    docs = [np.array(prefix + list(ids), dtype=np.int64) for ids in get_tokenizer().encode(texts)]
    return Documents(p.name, str(path), kind, docs)


def evaluate(scorer: Scorer, datasets: list[Documents], settings: list[tuple[int, int]],
             per_document: list[dict] | None = None) -> list[dict]:
    """One record per (dataset, length, stride): tokens scored, mean NLL, perplexity; each
    document's numbers appended to `per_document` when given (report.document_rows)."""
    records = []
    for ds in datasets:
        scored = [max(len(d) - 1, 0) for d in ds.documents]
        count = sum(scored)
        for length, stride in settings:
            nll_per_doc, n_windows = document_nll(scorer, ds.documents, length, stride,
                                                  desc=f"ppl {ds.name} {length}:{stride}")
            if per_document is not None:
                what = {"suite": "ppl", "dataset": ds.name, "window": f"{length}:{stride}"}
                per_document += document_rows(what, nll_per_doc, scored)
            nll = float(nll_per_doc.sum())
            records.append({"suite": "ppl", "dataset": ds.name, "path": ds.path, "kind": ds.kind,
                            "seq_length": length, "stride": stride,
                            "documents": len(ds.documents), "windows": n_windows,
                            "tokens": count, "nll_sum": nll,
                            "mean_nll": nll / count if count else float("nan"),
                            "ppl": perplexity(nll, count)})
            log.info("ppl %s %d:%d: %.4f over %d tokens", ds.name, length, stride,
                     records[-1]["ppl"], count)
    return records
