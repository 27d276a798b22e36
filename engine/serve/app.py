"""The HTTP application: routes of both APIs, the bearer token, and every refusal as a 4xx with
a JSON error body. Generation itself goes through the Batcher, never on the event loop."""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from engine.data.tokenizer import Tokenizer
from engine.serve.batcher import Batcher
from engine.serve.body_limit import BodyLimit
from engine.serve.errors import ApiError
from engine.serve.limits import Limits
from engine.serve.megatron_api import MegatronRequest, megatron_response
from engine.serve.openai_api import CompletionRequest, completion_response, models_response


def create_app(batcher: Batcher, tokenizer: Tokenizer, limits: Limits, model: str,
               token: str | None) -> FastAPI:
    """The app; its lifespan starts and stops the batcher's worker."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="lmforge serve", lifespan=lifespan)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)
    if token is not None:  # added last: the outermost, a stranger's request goes no further
        app.middleware("http")(_bearer(token))
    created = int(time.time())

    @app.put("/api")
    async def megatron_generate(request: MegatronRequest) -> dict:
        limits.check_count(len(request.prompts), "prompts")
        prompts = request.token_ids(tokenizer)
        params = [request.sampling()] * len(prompts)
        limits.check(prompts, params, "prompts")
        results = await batcher.submit(prompts, params)
        return megatron_response(request, prompts, results, tokenizer)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> dict:
        if request.model not in (None, model):
            raise ApiError(404, f"model {request.model!r} does not exist; this server serves "
                           f"{model!r}", "model")
        limits.check_count(len(request.prompts()), "prompt")
        prompts = request.token_ids(tokenizer)
        params = [request.sampling()] * len(prompts)
        limits.check(prompts, params, "prompt")
        results = await batcher.submit(prompts, params)
        return completion_response(request, model, prompts, results, tokenizer)

    @app.get("/v1/models")
    async def models() -> dict:
        return models_response(model, limits.context, created)

    return app


def _bearer(token: str):
    """A middleware that refuses requests without `Authorization: Bearer <token>`, before their
    body is read (a stranger learns nothing, not even that the body was malformed). Compared in
    constant time: the answer's timing tells nothing about the token."""

    async def check(request: Request, call_next):
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            error = ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
            return JSONResponse(error.body(), 401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, ApiError(400, _describe(exc.errors()), _param(exc)))

    @app.exception_handler(ValidationError)  # SamplingParams refusing a request's values
    async def invalid_params(request: Request, exc: ValidationError) -> JSONResponse:
        return await api_error(request, ApiError(400, _describe(exc.errors()), _param(exc)))

    @app.exception_handler(HTTPException)  # unknown route, wrong method
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return await api_error(request, ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)  # a bug or a failed generate(): logged, answered as JSON
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return await api_error(request, ApiError(500, f"{type(exc).__name__}: {exc}"))


def _describe(errors) -> str:
    """`field: message` per problem; a model's own check without a field."""
    out = []
    for err in errors:
        loc = [str(p) for p in err["loc"] if p != "body"]
        msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(out)


def _param(exc) -> str | None:
    loc = [str(p) for p in exc.errors()[0]["loc"] if p != "body"]
    return ".".join(loc) or None
