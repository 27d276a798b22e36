"""Each token as the text it adds: Megatron's segments and OpenAI's log-probability tokens.
A lone token's decoding drops SentencePiece's leading space ("upon" for "▁upon"), so each token
is decoded after the ones before it, and the pieces join into the text."""

from __future__ import annotations

from typing import Sequence

from engine.data.tokenizer import Tokenizer
from engine.generate.generator import continuation_text


def token_texts(tokenizer: Tokenizer, before: Sequence[int], ids: Sequence[int]) -> list[str]:
    """The text each of `ids` adds after `before` and the ids ahead of it."""
    context, out = list(before), []
    for token in ids:
        out.append(continuation_text(tokenizer, context, [token]))
        context.append(token)
    return out
