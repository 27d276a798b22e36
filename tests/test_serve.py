"""`python -m engine serve` with a real HTTP client against a real uvicorn server on the real
stories260K model: Megatron-LM's PUT /api and OpenAI's /v1/completions answer what the generator
gives when called directly, concurrent requests share generate() calls and each gets its own
answer, bad requests get 4xx with a JSON message, and the bearer token is required."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch
import uvicorn

from conftest import forked_engine, shared
from engine.evaluate.source import load_source
from engine.generate.generator import Generator
from engine.generate.params import Completion, SamplingParams
from engine.serve.app import create_app
from engine.serve.batcher import Batcher
from engine.serve.limits import Limits
from engine.serve.spec import TOKEN_ENV

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["Once upon a time", "The little dog", "Lily", "One day, a girl named Sue found a"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(app):
    """The app under uvicorn in a thread on a free port; its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def source():
    return load_source(str(shared("tiny-llama", "hf")))


@pytest.fixture(scope="module")
def generator(source):
    """The generator the server uses; the tests call it directly for the expected answers."""
    return Generator(source.model.eval(), source.tokenizer(), torch.device("cpu"), progress=False)


@pytest.fixture(scope="module")
def calls(generator):
    """Every generate() call the server made: the prompts of each."""
    return []


@pytest.fixture(scope="module")
def server(source, generator, calls):
    def generate(prompts, params):
        calls.append(len(prompts))
        return generator.generate(prompts, params)

    limits = Limits(max_prompts=4, max_prompt_tokens=64, max_tokens=32, max_batch=8,
                    context=generator.context, vocab_size=source.cfg.vocab_size,
                    max_request_bytes=4096)
    app = create_app(Batcher(generate, limits.max_batch), generator.tokenizer, limits,
                     "stories260K", TOKEN)
    with serving(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client


def bos_prompts(tokenizer, texts):
    return [[tokenizer.bos_id] + list(ids) for ids in tokenizer.encode(texts)]


def test_megatron_api_greedy_equals_the_generator(server, generator):
    tok = generator.tokenizer
    answer = server.put("/api", json={"prompts": TEXTS[:2], "tokens_to_generate": 12,
                                      "top_k": 1})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    prompts = [list(ids) for ids in tok.encode(TEXTS[:2])]  # Megatron's add_BOS is off
    expected = generator.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    for i, ((c,), prompt) in enumerate(zip(expected, prompts)):
        assert body["text"][i] == TEXTS[i] + c.text
        assert body["tokens"][i] == prompt + c.token_ids
        assert "".join(body["segments"][i]) == body["text"][i]  # each token's own text
    assert body["logprobs"] is None

    answer = server.put("/api", json={"prompts": [TEXTS[2]], "tokens_to_generate": 8,
                                      "top_k": 1, "add_BOS": True, "logprobs": True})
    (c,), = generator.generate(bos_prompts(tok, TEXTS[2:3]),
                               SamplingParams(temperature=0, max_tokens=8, logprobs=True))
    body = answer.json()
    assert body["tokens"][0][0] == tok.bos_id and body["text"][0] == TEXTS[2] + c.text
    assert body["logprobs"][0] == pytest.approx(c.logprobs)


def test_megatron_api_seeded_sampling_and_stop_on_eol(server):
    request = {"prompts": TEXTS[:2], "tokens_to_generate": 16, "temperature": 0.9,
               "top_p": 0.9, "random_seed": 7, "stop_on_eol": True}
    first, again = (server.put("/api", json=request).json() for _ in range(2))
    assert first == again  # a seeded prompt's output does not depend on its batch
    assert all("\n" not in text for text in first["text"])


def test_megatron_api_empty_prompt_with_bos(server, generator):
    body = server.put("/api", json={"prompts": [""], "add_BOS": True, "tokens_to_generate": 6,
                                    "top_k": 1}).json()
    (c,), = generator.generate([[generator.tokenizer.bos_id]],
                               SamplingParams(temperature=0, max_tokens=6))
    assert body["tokens"][0] == [generator.tokenizer.bos_id] + c.token_ids
    assert body["text"][0] == c.text


def test_openai_stop_strings(server):
    body = server.post("/v1/completions", json={"prompt": TEXTS[0], "max_tokens": 32,
                                                "temperature": 0, "stop": ["."]}).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == "."
    assert choice["text"] == ", there was a little girl named Lily"


def test_openai_completions_greedy_equals_the_generator(server, generator):
    tok = generator.tokenizer
    answer = server.post("/v1/completions", json={
        "model": "stories260K", "prompt": TEXTS[:3], "max_tokens": 10, "temperature": 0,
        "logprobs": 0})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    prompts = bos_prompts(tok, TEXTS[:3])  # text prompts start with BOS, as vLLM encodes them
    expected = generator.generate(prompts, SamplingParams(temperature=0, max_tokens=10,
                                                          logprobs=True))
    assert body["object"] == "text_completion" and body["model"] == "stories260K"
    for i, (c,) in enumerate(expected):
        choice = body["choices"][i]
        assert choice["index"] == i and choice["text"] == c.text
        assert choice["finish_reason"] == c.finish_reason
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(c.logprobs)
        tokens = choice["logprobs"]["tokens"]
        assert len(tokens) == len(c.token_ids) and "".join(tokens).startswith(c.text)
        assert choice["logprobs"]["text_offset"][-1] == len("".join(tokens[:-1]))
    generated = sum(len(c.token_ids) for (c,) in expected)
    assert body["usage"] == {"prompt_tokens": sum(map(len, prompts)),
                             "completion_tokens": generated,
                             "total_tokens": sum(map(len, prompts)) + generated}


def test_openai_token_prompts_n_echo_and_models(server, generator):
    ids = bos_prompts(generator.tokenizer, TEXTS[3:4])[0]
    body = server.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "n": 3,
                                                "seed": 3, "echo": True}).json()
    (expected,) = generator.generate([ids], SamplingParams(n=3, seed=3, max_tokens=6))
    prefix = generator.tokenizer.decode(ids)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [prefix + c.text for c in expected]
    models = server.get("/v1/models").json()
    assert models["data"][0]["id"] == "stories260K"
    assert models["data"][0]["max_model_len"] == generator.context


def test_concurrent_requests_are_batched_and_answered_each(server, generator, calls):
    tok = generator.tokenizer
    lengths = [32, 19, 25, 17, 30, 21]  # long enough that requests queue behind a call
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(lengths))]

    async def ask_all():
        async with httpx.AsyncClient(base_url=str(server.base_url), headers=AUTH,
                                     timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={
                "prompt": text, "max_tokens": n, "temperature": 0})
                for text, n in zip(texts, lengths)))

    calls.clear()
    answers = asyncio.run(ask_all())
    assert len(calls) < len(lengths) and max(calls) > 1  # some requests shared a call
    for answer, text, n in zip(answers, texts, lengths):
        (c,), = generator.generate(bos_prompts(tok, [text]),
                                   SamplingParams(temperature=0, max_tokens=n))
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["text"] == c.text


@pytest.mark.parametrize("method, path, body, status, message", [
    ("PUT", "/api", {}, 400, "prompts: Field required"),
    ("PUT", "/api", {"prompts": "Lily"}, 400, "prompts: Input should be a valid list"),
    ("PUT", "/api", {"prompts": ["Lily"], "tokens_to_generate": "5"}, 400,
     "tokens_to_generate: Input should be a valid integer"),
    ("PUT", "/api", {"prompts": ["Lily"], "max_len": 5}, 400, "Replace with tokens_to_generate"),
    ("PUT", "/api", {"prompts": ["Lily"], "beam_width": 2}, 400, "not supported by this "
     "server: beam_width"),
    ("PUT", "/api", {"prompts": ["Lily"], "top_k": 5, "top_p": 0.5}, 400, "cannot set both"),
    ("PUT", "/api", {"prompts": [""]}, 400, "Empty prompts require add_BOS=true"),
    ("PUT", "/api", {"prompts": ["Lily"], "tokens_to_generate": 0}, 400, "scoring the prompt"),
    ("PUT", "/api", {"prompts": ["Lily"] * 5}, 413, "at most 4 per request"),
    ("PUT", "/api", {"prompts": ["Lily"], "tokens_to_generate": 33}, 422, "at most 32"),
    ("PUT", "/api", {"prompts": ["Lily " * 80]}, 413, "prompts of at most 64 tokens"),
    ("POST", "/v1/completions", {"prompt": "Lily", "stream": True}, 400, "stream"),
    ("POST", "/v1/completions", {"prompt": "Lily", "logprobs": 2}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "Lily", "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "Lily", "colour": "red"}, 400,
     "colour: Extra inputs are not permitted"),
    ("POST", "/v1/completions", {"prompt": [[1, 9999]]}, 400, "outside the model's vocabulary"),
    ("POST", "/v1/completions", {"prompt": ["a", "b", "c"], "n": 3}, 413, "at most 8 at once"),
    ("POST", "/v1/completions", {"prompt": "Lily", "model": "gpt-4"}, 404, "does not exist"),
    ("POST", "/v1/completions", [], 400, "valid dictionary"),
    ("GET", "/nowhere", None, 404, "Not Found"),
    ("GET", "/api", None, 405, "Method Not Allowed"),
])
def test_bad_requests_get_4xx_with_a_message(server, method, path, body, status, message):
    answer = server.request(method, path, json=body)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]["message"]


def test_a_body_over_the_limit_is_a_413(server):
    big = {"prompts": ["Lily " * 1000]}
    assert server.put("/api", json=big).status_code == 413

    def chunks():  # no Content-Length: refused once the limit passes
        yield b'{"prompts": ["'
        for _ in range(10):
            yield b"Lily " * 100
        yield b'"]}'

    answer = server.put("/api", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413 and "4096 bytes" in answer.json()["error"]["message"]


def test_malformed_json_is_a_400(server):
    answer = server.put("/api", content=b'{"prompts": [', headers={"content-type":
                                                                    "application/json"})
    assert answer.status_code == 400 and "JSON" in answer.json()["error"]["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": TOKEN}])
def test_the_token_is_required(server, headers):
    for method, path in (("GET", "/v1/models"), ("PUT", "/api"), ("POST", "/v1/completions")):
        answer = httpx.request(method, f"{server.base_url}{path}", headers=headers,
                               json={"prompts": ["Lily"]})
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in answer.json()["error"]["message"]
    assert server.get("/v1/models").status_code == 200  # the client carries the right one


def test_the_command_serves_until_stopped():
    """`python -m engine serve` (forked_engine): loads, answers (its token from the
    environment), and stops cleanly on SIGTERM."""
    port = free_port()
    proc = forked_engine(["serve", "--load-dir", shared("tiny-llama", "hf"), "--port", port,
                          "--device", "cpu", "--max-tokens", "8"], env={TOKEN_ENV: TOKEN})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.output()
            try:
                ready = httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200
            except httpx.TransportError:
                ready = False
            if ready:
                break
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        answer = httpx.put(f"{url}/api", headers=AUTH, json={"prompts": ["Lily"],
                                                             "tokens_to_generate": 4})
        assert answer.status_code == 200 and answer.json()["text"][0].startswith("Lily")
        assert httpx.put(f"{url}/api", headers=AUTH, json={
            "prompts": ["Lily"], "tokens_to_generate": 9}).status_code == 422
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_the_batcher_fills_calls_in_order_and_shares_failures():
    """Queued requests join one call while their sequences fit; one that does not opens the next
    call (order kept); a failed call fails each of its requests, and the worker goes on."""
    calls, release = [], threading.Event()

    def generate(prompts, params):
        calls.append([p[0] for p in prompts])
        if len(calls) == 1:
            release.wait(10)  # the first call runs while the others queue
        if prompts[0][0] == "boom":
            raise RuntimeError("boom")
        return [[Completion(list(p), p[0], "length")] * q.n for p, q in zip(prompts, params)]

    async def scenario():
        batcher = Batcher(generate, max_batch=3)
        batcher.start()
        one, two = SamplingParams(), SamplingParams(n=2)
        first = asyncio.ensure_future(batcher.submit([["a"]], [one]))
        while not calls:
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(batcher.submit(*job)) for job in
                [([["b"]], [two]), ([["c"]], [two]), ([["d"]], [one])]]
        await asyncio.sleep(0.05)
        release.set()
        answers = await asyncio.gather(first, *rest)
        failed = await asyncio.gather(batcher.submit([["boom"]], [one]), return_exceptions=True)
        after = await batcher.submit([["e"]], [one])
        await asyncio.to_thread(batcher.stop)
        return answers, failed, after

    answers, failed, after = asyncio.run(scenario())
    assert calls == [["a"], ["b"], ["c", "d"], ["boom"], ["e"]]
    assert [[c.text for c in a[0]] for a in answers] == [["a"], ["b", "b"], ["c", "c"], ["d"]]
    assert isinstance(failed[0], RuntimeError) and after[0][0].text == "e"
