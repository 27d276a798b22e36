"""WikiText word-level perplexity, Megatron-LM's convention (tasks/zeroshot_gpt): the whole file
is one token stream, the model reads the detokenized text, and the summed token NLL is divided by
the number of words of the original text, so models with different tokenizers are comparable:

    word_ppl = exp(sum of token NLLs / words),  words = len(original_text.split())

Megatron counts `text.split(" ")` of the one-line-per-paragraph release file, which also counts
each line break (WikiText-2 test: 241,211 words + 4,358 lines = the published 245,569 tokens);
we count whitespace-separated words only and report `words` and `tokens` beside the result, so
either normalisation can be recomputed from the record.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from engine.data.tokenizer import Tokenizer
from engine.evaluate.inputs import read_text
from engine.evaluate.ppl import perplexity, window_requests
from engine.evaluate.scoring import NLL, SCORED, Scorer

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


def count_words(text: str) -> int:
    return len(text.split())


def evaluate(scorer: Scorer, path: str, tokenizer: Tokenizer, bos_id: int | None,
             settings: list[tuple[int, int]], detokenize_text: bool) -> list[dict]:
    """One record per (length, stride): word and token perplexity of the whole file."""
    original = read_text(path)
    text = detokenize(original) if detokenize_text else original
    prefix = [bos_id] if bos_id is not None else []
    doc = np.array(prefix + list(tokenizer.encode([text])[0]), dtype=np.int64)
    words = count_words(original)
    records = []
    for length, stride in settings:
        results = scorer.score_all(window_requests([doc], length, stride),
                                   desc=f"wikitext {length}:{stride}")
        nll, tokens = float(results[:, NLL].sum()), int(results[:, SCORED].sum())
        records.append({"suite": "wikitext", "dataset": Path(path).name, "path": str(path),
                        "seq_length": length, "stride": stride, "detokenized": detokenize_text,
                        "words": words, "tokens": tokens, "nll_sum": nll,
                        "word_ppl": perplexity(nll, words),
                        "token_ppl": perplexity(nll, tokens)})
    return records
