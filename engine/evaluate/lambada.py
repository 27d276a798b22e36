"""LAMBADA: predict the last word of a passage; strict whole-word accuracy and last-word perplexity.

The target is the last whitespace-separated word of the text; the context is everything before the
whitespace in front of it. The text is tokenized whole (BOS first) and the target's tokens are
those after the longest common prefix with the tokenized context, i.e. the tokens the model reads
for that word in running text.

Strict whole-word match: an example is correct when
1. greedy decoding from the context produces exactly the target's tokens (checked teacher-forced:
   at every target position the argmax is the target token, which is what greedy decoding would
   have generated), and
2. the greedy token after them does not continue the word: decoding the target's tokens plus that
   token gives the target's text followed by something that does not start with a letter or digit
   (whitespace, punctuation, end of text). "sign" is wrong for "signs" (1 fails); "signs" followed
   by greedy "s" or "ing" is wrong too (2 fails); "signs" followed by "." or " and" is right.

Perplexity: `ppl_word` = exp(mean over examples of the summed NLL of the target's tokens), the
per-word convention of lm-evaluation-harness; `ppl_token` = exp(total target NLL / target tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.data.tokenizer import Tokenizer
from engine.errors import InputError
from engine.evaluate.inputs import read_jsonl
from engine.evaluate.ppl import perplexity
from engine.evaluate.scoring import MISMATCHES, NEXT_ID, NLL, SCORED, Request, Scorer


def split_target(text: str) -> tuple[str, str]:
    """(context, target word): the context ends before the whitespace preceding the word."""
    text = text.rstrip()
    cut = max(text.rfind(c) for c in (" ", "\n", "\t"))
    if cut <= 0:
        raise ValueError("needs at least two words")
    return text[:cut], text[cut + 1:]


def continues_word(tokenizer: Tokenizer, target: list[int], next_id: int) -> bool:
    """Whether greedy `next_id` after the target's tokens would extend the target word."""
    alone, extended = tokenizer.decode(target), tokenizer.decode(target + [next_id])
    if not extended.startswith(alone):
        return True  # the next token completes a character of the word
    rest = extended[len(alone):]
    return bool(rest) and rest[0].isalnum()


def build_requests(texts: list[str], tokenizer: Tokenizer, bos_id: int | None,
                   max_length: int, path: str) -> tuple[list[Request], int]:
    """One request per example (context + target, target scored); how many were left-cut."""
    prefix = [bos_id] if bos_id is not None else []
    pairs = []
    for number, text in enumerate(texts, start=1):
        try:
            pairs.append(split_target(text))
        except ValueError as exc:
            raise InputError(f"{path}: example {number}: {exc}") from None
    wholes = tokenizer.encode([text.rstrip() for text in texts])
    contexts = tokenizer.encode([c for c, _ in pairs])
    requests, cut = [], 0
    for number, (whole, context) in enumerate(zip(wholes, contexts), start=1):
        whole, context = prefix + list(whole), prefix + list(context)
        n = next((i for i, (a, b) in enumerate(zip(context, whole)) if a != b),
                 min(len(context), len(whole)))
        if n == len(whole) or n == 0:
            raise InputError(f"{path}: example {number}: the target word has no tokens of its "
                             "own, or there is no context before it")
        if len(whole) > max_length:
            drop = len(whole) - max_length
            if drop >= n:
                raise InputError(f"{path}: example {number}: the target word alone is longer "
                                 f"than the context ({max_length} tokens)")
            whole, n, cut = whole[drop:], n - drop, cut + 1
        requests.append(Request(np.array(whole, dtype=np.int64), n))
    return requests, cut


def evaluate(scorer: Scorer, path: str, tokenizer: Tokenizer, bos_id: int | None,
             max_length: int, text_key: str, limit: int | None) -> list[dict]:
    texts = read_jsonl(path, text_key)[:limit]
    requests, cut = build_requests(texts, tokenizer, bos_id, max_length, path)
    results = scorer.score_all(requests, desc="lambada")
    correct = 0
    for request, row in zip(requests, results):
        target = [int(t) for t in request.tokens[request.score_from:]]
        if row[MISMATCHES] == 0 and not continues_word(tokenizer, target, int(row[NEXT_ID])):
            correct += 1
    nll, tokens = float(results[:, NLL].sum()), int(results[:, SCORED].sum())
    return [{"suite": "lambada", "dataset": Path(path).name, "path": str(path),
             "examples": len(requests), "correct": correct,
             "accuracy": correct / len(requests) if requests else float("nan"),
             "target_tokens": tokens, "nll_sum": nll,
             "ppl_word": perplexity(nll, len(requests)), "ppl_token": perplexity(nll, tokens),
             "contexts_cut": cut}]
