r"""WikiText word-level perplexity from the release text (`wiki.test.raw`), in the convention of
lm-evaluation-harness (`wikitext` task) or of Megatron-LM (`tasks/zeroshot_gpt`). Both read the
text after the same detokenizer (`detokenize`) and divide the summed token NLL by counts of the
**original** text, so models with different tokenizers are comparable:

lm-eval: documents are the articles (`articles`); each is encoded (BOS first with add_bos) and
every token of it is scored, the first from a prefix token (BOS, else EOS), in back-to-back
windows whose last is given the full context;
    word_ppl = exp(Σ NLL / Σ words),  words of an article = len(re.split(r"\s+", article))
    byte_ppl = exp(Σ NLL / Σ UTF-8 bytes of the articles), bits_per_byte = log2(byte_ppl)
Megatron: the whole text is one token stream (BOS first with add_bos); windows as configured,
the last one padded; "adjusted perplexity"
    word_ppl = exp(Σ NLL / (len(text.strip().split(" ")) - 1))
which counts each line break as a word too; bytes are those of the whole text.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.tokenizer import Tokenizer
from engine.errors import InputError
from engine.evaluate.inputs import read_text
from engine.evaluate.ppl import document_nll, perplexity
from engine.evaluate.report import document_rows
from engine.evaluate.scoring import Scorer

log = logging.getLogger(__name__)

# Megatron-LM tasks/zeroshot_gpt/detokenizer.py `wikitext_detokenizer`, step by step.
_REPLACE_1 = [("s '", "s'")]
_REGEX_1 = [(r"/' [0-9]/", r"/'[0-9]/")]
_REPLACE_2 = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
              (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")]
_REGEX_2 = [(r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
            (r"{\s*([^}]*?)\s*}", r"{\1}"), (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
            (r"'\s*([^']*?)\s*'", r"'\1'")]
_REPLACE_3 = [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"),
              (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]


def detokenize(text: str) -> str:
    """Undo WikiText's Moses-style tokenisation (` @-@ `, ` , `, `( x )`, ...)."""
    for old, new in _REPLACE_1:
        text = text.replace(old, new)
    for pattern, repl in _REGEX_1:
        text = re.sub(pattern, repl, text)
    for old, new in _REPLACE_2:
        text = text.replace(old, new)
    for pattern, repl in _REGEX_2:
        text = re.sub(pattern, repl, text)
    for old, new in _REPLACE_3:
        text = text.replace(old, new)
    return text


def _is_article_title(line: str) -> bool:
    """An article's first line, " = Title = ", not a section's " = = Title = = "."""
    squeezed = line.replace("= = =", "===").replace("= =", "==").strip()
    return squeezed.startswith("= ") and squeezed.endswith(" =")


def articles(text: str) -> list[str]:
    """The articles of a WikiText release text, as EleutherAI/wikitext_document_level builds
    them (lm-eval's documents): lines split on "\n", a new article at each title line, lines
    joined with "\n"; blank text before the first title is dropped."""
    found, lines = [], []
    for line in text.split("\n"):
        if _is_article_title(line):
            if "\n".join(lines).strip():
                found.append("\n".join(lines))
            lines = []
        lines.append(line)
    return found + ["\n".join(lines)]


@dataclass
class Corpus:
    """What one convention scores: token documents (their first token only conditions), and the
    word and byte counts their NLL is divided by."""

    tokens: list[np.ndarray]
    words: int
    bytes: int
    align_last: bool


def documents(text: str, convention: str, tokenizer: Tokenizer, bos_id: int | None,
              detokenize_text: bool, limit: int | None = None) -> Corpus:
    """The token documents of `text` under the convention (lm-eval: the first `limit` articles;
    megatron: the whole text, never cut)."""
    prepare = detokenize if detokenize_text else (lambda t: t)
    bos = [bos_id] if bos_id is not None else []
    if convention == "megatron":
        (ids,) = tokenizer.encode([prepare(text)])
        return Corpus([np.array(bos + list(ids), dtype=np.int64)],
                         len(text.strip().split(" ")) - 1, len(text.encode()), False)
    pages = articles(text)[:limit]
    prefix = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eod_id]
    if prefix == [None]:
        raise InputError("the lm-eval convention predicts each article's first token from BOS "
                         "or EOS: the tokenizer has neither")
    ids = tokenizer.encode([prepare(page) for page in pages])
    return Corpus([np.array(prefix + bos + list(d), dtype=np.int64) for d in ids],
                     sum(len(re.split(r"\s+", page)) for page in pages),
                     sum(len(page.encode()) for page in pages), True)


def _looks_joined(text: str) -> bool:
    """Release lines all start with a space (blank ones are " "); rows joined with blank lines
    (the Hugging Face `wikitext` rows, "\n\n".join) have empty lines instead."""
    lines = text.split("\n")
    return sum(not line for line in lines) > len(lines) // 4


def evaluate(scorer: Scorer, path: str, tokenizer: Tokenizer, bos_id: int | None,
             settings: list[tuple[int, int]], detokenize_text: bool, convention: str,
             limit: int | None = None, per_document: list[dict] | None = None) -> list[dict]:
    """One record per (length, stride): word, byte and token perplexity of the text; each
    document's numbers appended to `per_document` when given (report.document_rows)."""
    text = read_text(path)
    if not text.strip():
        raise InputError(f"{path}: no text")
    if _looks_joined(text):
        log.warning("%s: many empty lines: is this the release text (wiki.test.raw)? Rows joined "
                    "with blank lines score extra newline tokens", path)
    docs = documents(text, convention, tokenizer, bos_id, detokenize_text, limit)
    tokens = sum(len(d) - 1 for d in docs.tokens)
    records = []
    for length, stride in settings:
        nll_per_doc, n_windows = document_nll(scorer, docs.tokens, length, stride,
                                              docs.align_last, f"wikitext {length}:{stride}")
        if per_document is not None:
            what = {"suite": "wikitext", "convention": convention, "dataset": Path(path).name,
                    "window": f"{length}:{stride}"}
            per_document += document_rows(what, nll_per_doc, [len(d) - 1 for d in docs.tokens])
        nll = float(nll_per_doc.sum())
        records.append({"suite": "wikitext", "convention": convention,
                        "dataset": Path(path).name, "path": str(path),
                        "seq_length": length, "stride": stride, "detokenized": detokenize_text,
                        "documents": len(docs.tokens), "windows": n_windows,
                        "words": docs.words, "bytes": docs.bytes, "tokens": tokens,
                        "nll_sum": nll, "word_ppl": perplexity(nll, docs.words),
                        "byte_ppl": perplexity(nll, docs.bytes),
                        "bits_per_byte": nll / docs.bytes / math.log(2),
                        "token_ppl": perplexity(nll, tokens)})
    return records
