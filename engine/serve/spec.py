"""The server's spec: torch-free, so that the CLI's help never imports torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.spec import StageSpec

TOKEN_ENV = "LMFORGE_SERVE_TOKEN"
_INPUT = {"input": True}


class Spec(StageSpec):
    """Serve a model (HF folder or native checkpoint) over HTTP: Megatron-LM's PUT /api and
    OpenAI's POST /v1/completions, concurrent requests batched together (docs/serve.md)."""

    load_dir: str = Field(description="model: HF folder (config.json) or native checkpoint "
                          "(root: its latest iteration, or an iter_* folder)",
                          json_schema_extra=_INPUT)
    tokenizer: str | None = Field(None, description="tokenizer file or folder; default: the "
                                  "model folder's (HF) or <checkpoint>/tokenizer/ (native)",
                                  json_schema_extra=_INPUT)
    model_name: str | None = Field(None, description="the model's name in /v1/models and in "
                                   "responses; default: the model folder's name")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 opens the server to "
                      "the network (set a token)")
    port: int = Field(8000, ge=0, le=65535)
    token: str | None = Field(None, description=f"bearer token every request must carry; "
                              f"default: ${TOKEN_ENV} (preferred: a flag shows in ps); none: "
                              f"no check")
    max_prompts: int = Field(128, ge=1, description="prompts per request at most (Megatron's "
                             "server takes 128)")
    max_prompt_tokens: int | None = Field(None, ge=1, description="tokens per prompt at most; "
                                          "default: the model's context")
    max_tokens: int = Field(1024, ge=1, description="new tokens per completion at most")
    max_request_bytes: int = Field(8 << 20, ge=1, description="request body size at most "
                                   "(refused before it is parsed)")
    max_batch: int = Field(64, ge=1, description="sequences (prompts × n) per generator call: "
                           "queued requests are batched up to this; a bigger request is refused")
    max_batch_tokens: int = Field(1 << 18, ge=1, description="the generator's budget per "
                                  "batch: rows × (longest prompt + new tokens)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when "
                                                   "available")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="compute dtype; auto: bf16 on GPU, fp32 on CPU")
