"""One thread owns the generator and batches concurrent requests.

The generator is synchronous and not thread-safe, and a forward pass over many sequences costs
little more than over one: so the event loop never calls it. Handlers queue their prompts (each
with its own sampling parameters) and await a future; the worker takes every queued request that
fits into `max_batch` sequences, makes one `generate()` call for all of them, and hands each
request its share of the results back on its own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from engine.generate.params import Completion, SamplingParams

log = logging.getLogger(__name__)
Generate = Callable[[list[Sequence[int]], list[SamplingParams]], list[list[Completion]]]
_STOP = object()  # queued by stop(): the worker ends after the requests queued before it


@dataclass
class _Job:
    prompts: list[Sequence[int]]
    params: list[SamplingParams]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    @property
    def sequences(self) -> int:
        return sum(p.n for p in self.params)


class Batcher:
    def __init__(self, generate: Generate, max_batch: int) -> None:
        self._generate = generate
        self._max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()  # _Job or _STOP
        self._held = None  # taken from the queue but did not fit the last batch
        self._thread = threading.Thread(target=self._work, name="generator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Answer what is queued, then end the worker (the server stops taking requests
        first)."""
        self._queue.put(_STOP)
        self._thread.join()

    async def submit(self, prompts: list[Sequence[int]],
                     params: list[SamplingParams]) -> list[list[Completion]]:
        """The completions of each prompt, from a generate() call shared with other requests.
        A request is never split across calls: the caller keeps it within `max_batch`."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(list(prompts), list(params), future, loop))
        return await future

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            self._run(jobs)

    def _take(self) -> list[_Job] | None:
        """Block for one request, then add whatever else is queued while it fits; None: stop."""
        first = self._queue.get() if self._held is None else self._held
        self._held = None
        if first is _STOP:
            return None
        jobs, size = [first], first.sequences
        while self._held is None:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP or size + job.sequences > self._max_batch:
                self._held = job  # the stop signal too: this batch is answered first
            else:
                jobs.append(job)
                size += job.sequences
        return jobs

    def _run(self, jobs: list[_Job]) -> None:
        prompts = [p for job in jobs for p in job.prompts]
        params = [p for job in jobs for p in job.params]
        try:
            results = self._generate(prompts, params)
        except Exception as exc:  # every request of the batch gets it (500), the worker lives on
            log.exception("generate() failed for a batch of %d prompts", len(prompts))
            for job in jobs:
                job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
            return
        start = 0
        for job in jobs:
            share = results[start:start + len(job.prompts)]
            start += len(job.prompts)
            job.loop.call_soon_threadsafe(_settle, job.future, share, None)


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    if future.done():  # the client went away and its handler was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
