"""LAMBADA: predict the last word of a passage; greedy and strict accuracy, last-word perplexity.

How the passage is split into context and target, and how they are tokenized, is a convention:

- `lm-eval` (lambada_openai + its HF model): context = the words before the last " ", target =
  " " + the last word, whitespace at the context's end moved into the target; context + target
  is encoded whole and the target is the tokens past the length of the context's own encoding.
- `megatron` (tasks/zeroshot_gpt with --strict-lambada): the last whitespace-separated word;
  context = the text before it, stripped, encoded alone; target = " " + word, encoded alone.
- `whole-word` (ours): the last whitespace-separated word; the context is everything before it,
  its whitespace run included; the text is encoded whole and the target is the tokens past the
  longest common prefix with the encoded context: what the model reads for that word in running
  text, with no newline of the run scored as part of it.

BOS (add_bos) precedes the context in every convention. Prompts longer than max_length + 1
tokens lose their beginning (lm-eval's rule: the model runs over max_length positions).

greedy (lm-eval's `acc`): at every target position the argmax is the target token, i.e. greedy
decoding from the context produces exactly the target's tokens. strict: greedy, and the greedy
token after them does not continue the word (decoding target + that token gives the target's text
followed by something that does not start with a letter or digit): "signs" followed by greedy
"s" is wrong, followed by "." or " and" right. A prompt that fills all max_length + 1 tokens has
no position left for that token: its strict result is its greedy one.

`ppl_word` = exp(mean over examples of the target's summed NLL), lm-eval's `perplexity`;
`ppl_token` = exp(total target NLL / target tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.data.tokenizer import Tokenizer
from engine.errors import InputError
from engine.evaluate.inputs import read_jsonl
from engine.evaluate.ppl import perplexity
from engine.evaluate.report import document_rows
from engine.evaluate.scoring import MISMATCHES, NEXT_ID, NLL, SCORED, Request, Scorer

def lm_eval_split(text: str) -> tuple[str, str]:
    """(context, target) as lm-eval's lambada_openai task and HFLM's _encode_pair make them."""
    words = text.split(" ")
    context, target = " ".join(words[:-1]), " " + words[-1]
    kept = len(context.rstrip())
    return context[:kept], context[kept:] + target


def last_word_split(text: str) -> tuple[str, str]:
    """(everything before the last whitespace-separated word, that word)."""
    text = text.rstrip()
    word = text.split()[-1] if text else ""
    return text[:len(text) - len(word)], word


SPLITS = {"lm-eval": lm_eval_split, "megatron": last_word_split, "whole-word": last_word_split}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def encode_pairs(texts: list[str], convention: str, tokenizer: Tokenizer,
                 bos_id: int | None) -> list[tuple[list[int], list[int]]]:
    """(context tokens, target tokens) of every text under the convention."""
    bos = [bos_id] if bos_id is not None else []
    splits = [SPLITS[convention](text) for text in texts]
    contexts = tokenizer.encode([c.strip() if convention == "megatron" else c for c, _ in splits])
    if convention == "megatron":
        targets = tokenizer.encode([" " + word for _, word in splits])
        return [(bos + list(c), list(t)) for c, t in zip(contexts, targets)]
    pairs = []
    for (context, target), c, whole in zip(splits, contexts,
                                           tokenizer.encode([c + t for c, t in splits])):
        c, whole = bos + list(c), bos + list(whole)
        n = len(c) if convention == "lm-eval" else _common_prefix(c, whole)
        pairs.append((c[:n], whole[n:]))
    return pairs


def build_requests(texts: list[str], convention: str, tokenizer: Tokenizer, bos_id: int | None,
                   max_length: int, path: str) -> tuple[list[Request], int]:
    """One request per example (context + target, target scored); how many were left-cut."""
    for number, text in enumerate(texts, start=1):
        if not all(SPLITS[convention](text)):
            raise InputError(f"{path}: example {number}: needs at least two words")
    requests, cut = [], 0
    for number, (context, target) in enumerate(
            encode_pairs(texts, convention, tokenizer, bos_id), start=1):
        if not target or not context:
            raise InputError(f"{path}: example {number}: the target word has no tokens of its "
                             "own, or there is no context before it")
        tokens = (context + target)[-(max_length + 1):]
        if len(tokens) <= len(target):
            raise InputError(f"{path}: example {number}: the target word alone fills the "
                             f"context ({max_length} tokens)")
        cut += len(context) + len(target) > len(tokens)
        requests.append(Request(np.array(tokens, dtype=np.int64), len(tokens) - len(target),
                                read_last=len(tokens) <= max_length))
    return requests, cut


def continues_word(tokenizer: Tokenizer, target: list[int], next_id: int) -> bool:
    """Whether greedy `next_id` after the target's tokens would extend the target word."""
    alone, extended = tokenizer.decode(target), tokenizer.decode(target + [next_id])
    if not extended.startswith(alone):
        return True  # the next token completes a character of the word
    rest = extended[len(alone):]
    return bool(rest) and rest[0].isalnum()


def score(scorer: Scorer, requests: list[Request],
          tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per example: the target's summed NLL, greedy correct, strict correct; and how many target
    tokens in all."""
    results = scorer.score_all(requests, desc="lambada")
    greedy = results[:, MISMATCHES] == 0
    strict = greedy.copy()
    for i, request in enumerate(requests):
        if greedy[i] and request.read_last:
            target = [int(t) for t in request.tokens[request.score_from:]]
            strict[i] = not continues_word(tokenizer, target, int(results[i, NEXT_ID]))
    return results[:, NLL], greedy, strict, int(results[:, SCORED].sum())


def evaluate(scorer: Scorer, path: str, tokenizer: Tokenizer, bos_id: int | None,
             max_length: int, text_key: str, limit: int | None, convention: str,
             per_document: list[dict] | None = None) -> list[dict]:
    """The record of the dataset; each example's numbers appended to `per_document` when given
    (report.document_rows: the target's log-probability and tokens, greedy and strict)."""
    texts = read_jsonl(path, text_key)[:limit]
    requests, cut = build_requests(texts, convention, tokenizer, bos_id, max_length, path)
    nll, greedy, strict, tokens = score(scorer, requests, tokenizer)
    if per_document is not None:
        per_document += document_rows(
            {"suite": "lambada", "convention": convention, "dataset": Path(path).name}, nll,
            [len(r.tokens) - r.score_from for r in requests],
            greedy=greedy.tolist(), strict=strict.tolist())
    n = len(requests)
    return [{"suite": "lambada", "convention": convention, "dataset": Path(path).name,
             "path": str(path), "examples": n,
             "correct": int(greedy.sum()), "accuracy": float(greedy.mean()) if n else float("nan"),
             "correct_strict": int(strict.sum()),
             "accuracy_strict": float(strict.mean()) if n else float("nan"),
             "target_tokens": tokens, "nll_sum": float(nll.sum()),
             "ppl_word": perplexity(float(nll.sum()), n),
             "ppl_token": perplexity(float(nll.sum()), tokens), "contexts_cut": cut}]
