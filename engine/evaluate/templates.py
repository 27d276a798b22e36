"""FinEval's prompt templates (engine/evaluate/fineval.py builds the prompts): the defaults and
the check of a user's own, torch-free so that the evaluate spec can use them."""

from __future__ import annotations

import string

from engine.errors import SpecError
from engine.evaluate.fineval_data import CHOICES

DEFAULT_HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
DEFAULT_QUESTION = "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n答案："
DEFAULT_SHOT = "{answer}\n\n"
_PLACEHOLDERS = {"header": {"subject", "subject_zh", "category"},
                 "question": {"question", *CHOICES},
                 "shot": {"question", *CHOICES, "answer"}}


def check_template(part: str, text: str) -> None:
    """Unknown placeholders (or {answer} in the question template) are spec errors."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise SpecError(f"fineval_{part} template {text!r}: {exc} (write literal braces as "
                        "{{ and }})") from None
    unknown = names - _PLACEHOLDERS[part]
    if unknown:
        raise SpecError(f"fineval_{part} template: unknown placeholder(s) "
                        f"{', '.join(sorted(unknown))}; allowed: "
                        f"{', '.join(sorted(_PLACEHOLDERS[part]))}")
