"""The inline executor: the stage runs in the calling process as rank 0 of 1 — no job, no child
process, no requeue — so a debugger's breakpoints and the exception's own traceback work. The run
folder is kept as for any job (spec, attempts, rank 0's log), so the Job API is the same."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from cluster.attempts import begin_attempt, read_attempts, with_attempts
from cluster.layout import RunDir
from engine.manifest import Manifest
from engine.redact import redact_text
from engine.registry import get_stage
from engine.spec import StageSpec

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as the engine's CLI logs


class _RedactingFormatter(logging.Formatter):
    """URL passwords masked, as in a job's rank logs (cluster/engine_process.py)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _engine_log_to(path) -> Iterator[None]:
    """The engine's INFO log also goes to rank 0's log file while the stage runs."""
    logger = logging.getLogger("engine")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_RedactingFormatter(_LOG_FORMAT))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def run_inline(stage: str, spec: StageSpec, run: RunDir, env: dict[str, str],
               checkpoint_dir: str | None, artifact: str | None) -> Manifest:
    begin_attempt(run, checkpoint_dir)
    single = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    with _environment({**env, **single}), _engine_log_to(run.rank_log(0)):
        manifest = get_stage(stage).run(spec)
    return with_attempts(manifest, read_attempts(run), artifact)
