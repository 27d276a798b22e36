"""OpenAI's legacy completions API (`POST /v1/completions`, `GET /v1/models`) as vLLM serves it:
OpenAI's fields plus vLLM's sampling extras (top_k, min_p, repetition_penalty, stop_token_ids,
ignore_eos), mapped onto SamplingParams.

Refused with 400 rather than ignored: streaming, suffix, logit_bias, best_of other than n, top
log-probability alternatives (logprobs > 0: the generator gives the chosen token's only) and echo
with logprobs (prompt tokens are not scored). Text prompts start with BOS, as vLLM encodes them
for Llama-family tokenizers; token-id prompts are taken as given.
"""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.data.tokenizer import Tokenizer
from engine.generate.params import Completion, SamplingParams
from engine.serve.segments import token_texts

Prompt = str | list[str] | list[int] | list[list[int]]
_SAMPLING = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
             "frequency_penalty", "presence_penalty", "max_tokens", "stop_token_ids",
             "ignore_eos", "seed")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: Prompt
    max_tokens: int = Field(16, description="OpenAI's default")
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=0, description="0: each chosen token's "
                                 "log-probability; top alternatives are not computed")
    echo: bool = False
    stream: bool = False
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, not used

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        unsupported = {"stream": self.stream, "suffix": self.suffix is not None,
                       "logit_bias": bool(self.logit_bias),
                       "best_of other than n": self.best_of not in (None, self.n),
                       "echo with logprobs": self.echo and self.logprobs is not None}
        refused = [name for name, asked in unsupported.items() if asked]
        if refused:
            raise ValueError(f"not supported by this server: {', '.join(refused)}")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list: of strings, or of token-id lists."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return self.prompt

    def token_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        prompts = self.prompts()
        if not prompts or not isinstance(prompts[0], str):
            return [list(ids) for ids in prompts]
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        return [bos + list(ids) for ids in tokenizer.encode(prompts)]

    def sampling(self) -> SamplingParams:
        """vLLM's SamplingParams from the request; its validation errors are the client's (400)."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(**{name: getattr(self, name) for name in _SAMPLING}, stop=stop,
                              logprobs=self.logprobs is not None)


def completion_response(request: CompletionRequest, model: str, prompts: list[list[int]],
                        results: list[list[Completion]], tokenizer: Tokenizer) -> dict:
    """OpenAI's text_completion object: choices prompt by prompt, n each, and the usage."""
    echoed = [_echo(p, ids, tokenizer) if request.echo else ""
              for p, ids in zip(request.prompts(), prompts)]
    choices = [_choice(i * request.n + j, echoed[i] + c.text,
                       _logprobs(c, prompts[i], tokenizer) if request.logprobs is not None
                       else None, c)
               for i, completions in enumerate(results) for j, c in enumerate(completions)]
    generated = sum(len(c.token_ids) for completions in results for c in completions)
    used = sum(map(len, prompts))
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": {"prompt_tokens": used, "completion_tokens": generated,
                      "total_tokens": used + generated}}


def _echo(prompt: str | list[int], ids: list[int], tokenizer: Tokenizer) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(ids)


def _choice(index: int, text: str, logprobs: dict | None, completion: Completion) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs,
            "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}


def _logprobs(completion: Completion, prompt: list[int], tokenizer: Tokenizer) -> dict:
    """OpenAI's shape: each generated token as text, its log-probability, and where its text
    starts in the completion's."""
    tokens = token_texts(tokenizer, prompt, completion.token_ids)
    offsets = [sum(map(len, tokens[:k])) for k in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": completion.logprobs, "top_logprobs": None,
            "text_offset": offsets}


def models_response(model: str, context: int, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "lmforge", "max_model_len": context}]}
