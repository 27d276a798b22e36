"""Passkey retrieval (Mohtashami & Jaggi 2023; the test LongLoRA and YaRN report): a random
5-digit number hidden at a given depth in repeated filler text of a given length, then asked
for. A trial counts as retrieved when greedy decoding would produce exactly the number's tokens
after the question (every one the model's argmax given the ones before:
engine/evaluate/scoring.py), so one teacher-forced pass scores it.

The prompt is built from token pieces, [BOS] intro, filler × before, needle, filler × after,
question, answer, with as many fillers as fit the length; the depth is the share of fillers
before the needle (0: right after the intro, 1: just before the question).
"""

from __future__ import annotations

import random

import numpy as np

from engine.data.tokenizer import Tokenizer
from engine.evaluate.scoring import MISMATCHES, Request, Scorer

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def build_request(tokenizer: Tokenizer, bos_id: int | None, length: int, depth: float,
                  key: str) -> Request:
    """One trial of at most `length` tokens, the answer scored."""
    intro, filler, needle, question, answer = (
        list(ids) for ids in tokenizer.encode([INTRO, FILLER, NEEDLE.format(key=key), QUESTION,
                                              " " + key]))
    head = ([bos_id] if bos_id is not None else []) + intro
    fixed = len(head) + len(needle) + len(question) + len(answer)
    fillers = max(0, (length - fixed) // len(filler))
    before = round(depth * fillers)
    tokens = head + filler * before + needle + filler * (fillers - before) + question + answer
    return Request(np.asarray(tokens, dtype=np.int64), len(tokens) - len(answer), read_last=False)


def evaluate(scorer: Scorer, tokenizer: Tokenizer, bos_id: int | None, lengths: list[int],
             depths: list[float], trials: int, seed: int) -> list[dict]:
    """A record per length: retrieval accuracy over depths × trials, and per depth."""
    draw = random.Random(seed)
    cases = [(length, depth, str(draw.randrange(10_000, 100_000)))
             for length in lengths for depth in depths for _ in range(trials)]
    requests = [build_request(tokenizer, bos_id, *case) for case in cases]
    results = scorer.score_all(requests, desc="passkey")
    retrieved = results[:, MISMATCHES] == 0
    records = []
    for length in lengths:
        rows = [i for i, (n, _, _) in enumerate(cases) if n == length]
        by_depth = {str(d): float(np.mean([retrieved[i] for i in rows if cases[i][1] == d]))
                    for d in depths}
        records.append({"suite": "passkey", "length": length,
                        "tokens": int(np.mean([len(requests[i].tokens) for i in rows])),
                        "trials": len(rows), "accuracy": float(np.mean(retrieved[rows])),
                        "by_depth": by_depth})
    return records
