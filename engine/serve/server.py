"""`python -m engine serve`: load the model once, put the generator behind the batcher, and run
the app under uvicorn until stopped (Ctrl-C or SIGTERM: requests under way are answered)."""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from engine.evaluate.source import load_source
from engine.generate.generator import Generator
from engine.serve.app import create_app
from engine.serve.batcher import Batcher
from engine.serve.limits import Limits
from engine.serve.spec import TOKEN_ENV, Spec

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def run(spec: Spec) -> None:
    token = spec.token or os.environ.get(TOKEN_ENV) or None
    if token is None and spec.host not in _LOOPBACK:
        log.warning("serving on %s without a token: anyone who reaches the port can generate "
                    "(set %s)", spec.host, TOKEN_ENV)
    app = build_app(spec, token)
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    with _stopping_is_the_end():
        uvicorn.run(app, host=spec.host, port=spec.port, log_level=level)


@contextmanager
def _stopping_is_the_end():
    """uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again for the handlers
    it replaced: the CLI's, which would report a stage stopped midway (exit 75, "run again to
    resume"). A server stopped is done, so those are held off until uvicorn returns (exit 0)."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT,
                                                                     signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_app(spec: Spec, token: str | None) -> FastAPI:
    """The app over the spec's model, its limits and token."""
    source = load_source(spec.load_dir, spec.tokenizer)
    device = _device(spec.device)
    model = source.model.to(device=device, dtype=_dtype(spec.dtype, device)).eval()
    tokenizer = source.tokenizer()
    generator = Generator(model, tokenizer, device, max_batch_tokens=spec.max_batch_tokens,
                          max_batch=spec.max_batch, progress=False)
    context = generator.context
    limits = Limits(max_prompts=spec.max_prompts,
                    max_prompt_tokens=min(spec.max_prompt_tokens or context, context),
                    max_tokens=spec.max_tokens, max_batch=spec.max_batch, context=context,
                    vocab_size=source.cfg.vocab_size, max_request_bytes=spec.max_request_bytes)
    log.info("serving %s on %s (%s), context %d", source.path, device, spec.dtype, context)
    return create_app(Batcher(generator.generate, spec.max_batch), tokenizer, limits,
                      spec.model_name or Path(spec.load_dir).resolve().name, token)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]
