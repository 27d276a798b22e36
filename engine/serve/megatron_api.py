"""Megatron-LM's text generation server API (`PUT /api`, megatron/inference/
text_generation_server.py): its request fields, defaults and checks, mapped onto SamplingParams.

What has no counterpart in the engine's generator is refused with 400, not ignored: beam search
(beam_width, length_penalty), top_p_decay / top_p_bound, prevent_newline_after_colon, and scoring
a prompt without generating (tokens_to_generate 0). Differences, by design: errors are 4xx (never
a 200 carrying a message); random_seed seeds each prompt on its own, so a prompt's output does
not depend on the others; stop_on_eol / stop_on_double_eol are stop strings, left out of the
text; logprobs cover the generated tokens only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.data.tokenizer import Tokenizer
from engine.generate.params import Completion, SamplingParams
from engine.serve.segments import token_texts

# Megatron's own messages for the fields it renamed
_RENAMED = {"max_len": "max_len is no longer used.  Replace with tokens_to_generate",
            "sentences": "sentences is no longer used.  Replace with prompts"}


class MegatronRequest(BaseModel):
    """The request body, Megatron's defaults; types checked as strictly as Megatron does."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompts: list[str]
    tokens_to_generate: int = Field(64, ge=0)
    logprobs: bool = False
    temperature: float = Field(1.0, gt=0, le=100)
    top_k: int = Field(0, ge=0, le=1000)
    top_p: float = Field(0.0, ge=0, le=1)
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    add_BOS: bool = False
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    prevent_newline_after_colon: bool = False
    random_seed: int = Field(-1, ge=-1, description="-1: drawn")
    no_log: bool = False  # accepted: no request's content is logged here anyway
    beam_width: int | None = None
    stop_token: int | None = Field(None, ge=0)
    length_penalty: float = 1.0

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        for old, message in _RENAMED.items():
            if isinstance(data, dict) and old in data:
                raise ValueError(message)
        return data

    @model_validator(mode="after")
    def _supported(self) -> MegatronRequest:
        if self.top_k > 0 and self.top_p > 0:
            raise ValueError("cannot set both top-k and top-p samplings.")
        if any(not p for p in self.prompts) and not self.add_BOS:
            raise ValueError("Empty prompts require add_BOS=true")
        unsupported = {"tokens_to_generate 0 (scoring the prompt)": self.tokens_to_generate == 0,
                       "beam_width (beam search)": self.beam_width is not None,
                       "length_penalty (beam search)": self.length_penalty != 1.0,
                       "top_p_decay": self.top_p_decay != 0.0,
                       "top_p_bound": self.top_p_bound != 0.0,
                       "prevent_newline_after_colon": self.prevent_newline_after_colon}
        refused = [name for name, asked in unsupported.items() if asked]
        if refused:
            raise ValueError(f"not supported by this server: {', '.join(refused)}")
        return self

    def sampling(self) -> SamplingParams:
        """top_k 1 is Megatron's greedy: the engine's temperature 0 (no random draw at all)."""
        stop = ["\n\n"] * self.stop_on_double_eol + ["\n"] * self.stop_on_eol
        return SamplingParams(
            temperature=0.0 if self.top_k == 1 else self.temperature, top_k=self.top_k,
            top_p=self.top_p or 1.0, max_tokens=self.tokens_to_generate, stop=stop,
            stop_token_ids=[] if self.stop_token is None else [self.stop_token],
            seed=None if self.random_seed < 0 else self.random_seed, logprobs=self.logprobs)

    def token_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        bos = [tokenizer.bos_id] if self.add_BOS and tokenizer.bos_id is not None else []
        return [bos + list(ids) for ids in tokenizer.encode(self.prompts)]


def megatron_response(request: MegatronRequest, prompts: list[list[int]],
                      results: list[list[Completion]], tokenizer: Tokenizer) -> dict:
    """Megatron's shape: per prompt, the prompt and its continuation as text, as tokens and as
    one string per token (segments); logprobs null unless asked."""
    done = [completions[0] for completions in results]
    tokens = [ids + c.token_ids for ids, c in zip(prompts, done)]
    return {"text": [p + c.text for p, c in zip(request.prompts, done)],
            "segments": [token_texts(tokenizer, [], ids) for ids in tokens],
            "tokens": tokens,
            "logprobs": [c.logprobs for c in done] if request.logprobs else None}
