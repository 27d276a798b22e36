"""FinEval multiple choice, zero- and few-shot, scored two ways from one set of prompts.

Prompt (FinEval's open-source evaluator, code/evaluators/unify_evaluator.py, the C-Eval layout):
k-shot = header + k dev questions of the same subject, each `question` template + `shot` template
(the answer letter and a blank line), then the question; the header names the subject by its key
("accounting"), as FinEval's code does. FinEval's evaluator puts no header on zero-shot prompts;
`zero_shot_header` adds it. The tokens start with BOS (FinEval tokenizes with special tokens).

- answer: FinEval's constrained decoding. The logits after the prompt, summed over the two tokens
  FinEval reads for each letter: the first token of "A" alone and the last token of "：A"
  (SentencePiece: "▁A" and "A"); the highest sum is the prediction.
- option: the log-likelihood of each option's text as the continuation of the prompt (summed over
  its tokens, no length normalisation); the most likely option is the prediction. The option's
  tokens are those it has after the question's "答案：" (tokenized once per question).

Prompts over the context are shortened by dropping the earliest shots first (the header stays);
if the question alone is still too long, its beginning is cut (BOS kept). Both are counted. For the
option method the context must also hold the longest option.

Accuracy per subject, per category and overall, each both question-weighted (FinEval's code) and
subject-averaged (FinEval's paper and README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from engine.data.tokenizer import Tokenizer
from engine.errors import InputError
from engine.evaluate.fineval_data import CHOICES, FinEval, Question, Subject
from engine.evaluate.scoring import NLL, PROBES, Request, Scorer
from engine.evaluate.templates import DEFAULT_HEADER, DEFAULT_QUESTION, DEFAULT_SHOT

METHODS = ("answer", "option")


@dataclass(frozen=True)
class Template:
    header: str = DEFAULT_HEADER
    question: str = DEFAULT_QUESTION
    shot: str = DEFAULT_SHOT
    zero_shot_header: bool = False

    def ask(self, q: Question) -> str:
        return self.question.format(question=q.question, **dict(zip(CHOICES, q.options)))

    def prompt(self, subject: Subject, shots: Sequence[Question], q: Question,
               few_shot: bool) -> str:
        head = (self.header.format(subject=subject.name, subject_zh=subject.name_zh,
                                   category=subject.category)
                if few_shot or self.zero_shot_header else "")
        body = "".join(self.ask(s) + self.shot.format(**s.fields()) for s in shots)
        return head + body + self.ask(q)


@dataclass(frozen=True)
class Fitted:
    tokens: list[int]
    shots_dropped: int
    tokens_cut: int


class Prompts:
    """Token sequences for a question under a context budget."""

    def __init__(self, data: FinEval, template: Template, tokenizer: Tokenizer,
                 bos_id: int | None, max_length: int) -> None:
        self.data, self.template, self.tok = data, template, tokenizer
        self.bos = [bos_id] if bos_id is not None else []
        self.max_length = max_length
        self.subjects = {s.name: s for s in data.subjects}

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode([text])[0])

    def fit(self, q: Question, k: int, reserve: int = 0) -> Fitted:
        budget = self.max_length - reserve
        shots = self.data.shots.get(q.subject, [])[:k]
        for used in range(k, -1, -1):
            text = self.template.prompt(self.subjects[q.subject], shots[k - used:], q, k > 0)
            content = self.encode(text)
            if len(self.bos) + len(content) <= budget:
                return Fitted(self.bos + content, k - used, 0)
        keep = budget - len(self.bos)
        if keep < 1:
            raise InputError(f"{q.where}: question {q.id}: its longest option leaves no room in "
                             f"the {self.max_length} positions of context")
        return Fitted(self.bos + content[len(content) - keep:], k, len(content) - keep)

    def continuations(self, q: Question) -> list[list[int]]:
        """Each option's tokens as they follow the question's prompt."""
        asked = self.template.ask(q)
        context = self.encode(asked)
        out = []
        for letter, option in zip(CHOICES, q.options):
            full = self.encode(asked + option)
            n = next((i for i, (a, b) in enumerate(zip(context, full)) if a != b),
                     min(len(context), len(full)))
            if n == len(full):
                raise InputError(f"{q.where}: question {q.id}: option {letter} is empty")
            out.append(full[n:])
        return out


def letter_token_ids(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """FinEval's two readings of each letter: encode("A")[0] and encode("：A")[-1]."""
    first = [list(tokenizer.encode([c])[0])[0] for c in CHOICES]
    last = [list(tokenizer.encode(["：" + c])[0])[-1] for c in CHOICES]
    return first, last


@dataclass
class Result:
    questions: list[Question]
    shots: list[int]
    scores: dict[str, np.ndarray]      # method -> [questions, len(shots), 4], higher is better
    truncation: dict[str, np.ndarray]  # method -> [questions, len(shots), 2]: dropped, cut
    records: list[dict]

    def predictions(self, method: str) -> np.ndarray:
        """[questions, len(shots)] index of the predicted option (ties: the first)."""
        return self.scores[method].argmax(axis=-1)


def evaluate(scorer: Scorer, data: FinEval, template: Template, tokenizer: Tokenizer,
             bos_id: int | None, max_length: int, shots: list[int],
             methods: list[str]) -> Result:
    questions = [q for s in data.subjects for q in data.questions[s.name]]
    prompts = Prompts(data, template, tokenizer, bos_id, max_length)
    first, last = letter_token_ids(tokenizer)
    shape = (len(METHODS), len(questions), len(shots))
    scores, truncation = np.zeros(shape + (4,)), np.zeros(shape + (2,))
    requests: list[Request] = []
    slots: list[tuple[str, int, int, int]] = []  # method, question, shot count, option
    for qi in range(scorer.rank, len(questions), scorer.world_size):
        q = questions[qi]
        options = prompts.continuations(q) if "option" in methods else []
        for ki, k in enumerate(shots):
            for method in methods:
                # an option's last token is only a target: it needs no position of its own
                reserve = max(map(len, options)) - 1 if method == "option" else 0
                fitted = prompts.fit(q, k, reserve)
                truncation[METHODS.index(method), qi, ki] = fitted.shots_dropped, fitted.tokens_cut
                for oi, cont in enumerate(options if method == "option" else [[]]):
                    requests.append(Request(np.array(fitted.tokens + cont), len(fitted.tokens),
                                            read_last=method == "answer"))
                    slots.append((method, qi, ki, oi))
    results = scorer.score(requests, probe_ids=first + last, desc="fineval")
    for (method, qi, ki, oi), row in zip(slots, results):
        m = METHODS.index(method)
        if method == "answer":
            scores[m, qi, ki] = row[PROBES:PROBES + 4] + row[PROBES + 4:PROBES + 8]
        else:
            scores[m, qi, ki, oi] = -row[NLL]
    summed = scorer.all_sum(np.concatenate([scores, truncation], axis=-1))  # over ranks
    result = Result(questions, shots,
                    {m: summed[METHODS.index(m), ..., :4] for m in methods},
                    {m: summed[METHODS.index(m), ..., 4:] for m in methods}, [])
    answers = np.array([CHOICES.index(q.answer) for q in questions])
    for method in methods:
        correct = result.predictions(method) == answers[:, None]
        for ki, k in enumerate(shots):
            result.records += accuracy_records(data.subjects, questions, correct[:, ki],
                                               {"shots": k, "method": method},
                                               result.truncation[method][:, ki])
    return result


def accuracy_records(subjects: list[Subject], questions: list[Question], correct: np.ndarray,
                     key: dict, truncation: np.ndarray) -> list[dict]:
    """Subject, category and overall accuracy; the coarser levels both question-weighted
    (`accuracy`) and averaged over their subjects (`accuracy_subject_avg`)."""
    base = {"suite": "fineval", **key}
    by_subject = {s.name: [] for s in subjects}
    for q, ok in zip(questions, correct):
        by_subject[q.subject].append(bool(ok))
    subject_records, categories = [], {}
    for s in subjects:
        hits = by_subject[s.name]
        if not hits:
            continue
        subject_records.append({**base, "level": "subject", "name": s.name, "name_zh": s.name_zh,
                                "category": s.category, "questions": len(hits),
                                "correct": sum(hits), "accuracy": sum(hits) / len(hits)})
        categories.setdefault(s.category, []).append(subject_records[-1])
    groups = [("category", name, categories[name]) for name in sorted(categories)]
    groups.append(("overall", "all", subject_records))
    records = list(subject_records)
    for level, name, members in groups:
        n, c = sum(m["questions"] for m in members), sum(m["correct"] for m in members)
        records.append({**base, "level": level, "name": name, "subjects": len(members),
                        "questions": n, "correct": c, "accuracy": c / n if n else float("nan"),
                        "accuracy_subject_avg": (sum(m["accuracy"] for m in members) / len(members)
                                                 if members else float("nan"))})
    records[-1].update(prompts_truncated=int((truncation.sum(axis=1) > 0).sum()),
                       shots_dropped=int(truncation[:, 0].sum()),
                       tokens_cut=int(truncation[:, 1].sum()))
    return records
