"""What one request may ask, checked before it is queued: prompts per request (413), tokens
per prompt (413), sequences per request (413: it could never fit a batch), new tokens per
completion (422), and what the model cannot do at all (400: unknown token ids, prompt plus new
tokens beyond its context)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from engine.generate.params import SamplingParams
from engine.serve.errors import ApiError


@dataclass(frozen=True)
class Limits:
    max_prompts: int
    max_prompt_tokens: int
    max_tokens: int
    max_batch: int
    context: int     # the model's positions
    vocab_size: int  # the model's
    max_request_bytes: int = 8 << 20

    def check_count(self, count: int, param: str) -> None:
        """Before tokenizing: an oversized request costs nothing."""
        if count == 0:
            raise ApiError(400, f"{param}: no prompt given", param)
        if count > self.max_prompts:
            raise ApiError(413, f"{param}: {count} prompts; this server takes at most "
                           f"{self.max_prompts} per request", param)

    def check(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
              param: str) -> None:
        sequences = sum(p.n for p in params)
        if sequences > self.max_batch:
            raise ApiError(413, f"{sequences} sequences (prompts × n); this server generates at "
                           f"most {self.max_batch} at once", param)
        for i, (ids, p) in enumerate(zip(prompts, params)):
            self._check_prompt(f"{param}[{i}]", ids, p)

    def _check_prompt(self, where: str, ids: Sequence[int], p: SamplingParams) -> None:
        if not ids:
            raise ApiError(400, f"{where}: empty prompt (no tokens): give text or add BOS", where)
        if len(ids) > self.max_prompt_tokens:
            raise ApiError(413, f"{where}: {len(ids)} tokens; this server takes prompts of at "
                           f"most {self.max_prompt_tokens} tokens", where)
        if p.max_tokens > self.max_tokens:
            raise ApiError(422, f"{p.max_tokens} new tokens asked; this server generates at most "
                           f"{self.max_tokens} per completion", where)
        if len(ids) + p.max_tokens > self.context:
            raise ApiError(400, f"{where}: {len(ids)} prompt tokens + {p.max_tokens} new tokens "
                           f"exceed the model's context of {self.context} positions", where)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"{where}: token id {bad[0]} is outside the model's vocabulary "
                           f"(0..{self.vocab_size - 1})", where)
