"""Submitting a stage and waiting for it from a Prefect task.

Submission is retried when it fails for a reason that may pass (sbatch or sinfo not answering,
a filesystem hiccup); a wrong spec, profile or resource request (engine.errors.LmforgeError) and a
job that ran and failed are not retried. Waiting is `Job.wait`, a coroutine: no worker thread is
held while a job runs for days, and rank 0's log lines go to the task's logger as they appear.
"""

from __future__ import annotations

import asyncio
import logging
import time

from cluster.jobs import Job
from cluster.profiles import Profile
from cluster.resources import Resources
from cluster.submit import submit
from engine.errors import LmforgeError
from engine.manifest import Manifest
from engine.redact import redact_text
from engine.spec import StageSpec

RETRY_DELAYS_S = (5.0, 20.0, 60.0)
QUEUE_ALLOWANCE_S = 24 * 3600.0  # how long a job may wait in the queue, on top of its run time
STOP_TIMEOUT_S = 300.0  # scancel to the job's end: Slurm's KillWait, a save on SIGTERM


def wait_limit_s(profile: Profile, resources: Resources) -> float:
    """Every attempt's time limit (requeues included) plus time in the queue."""
    return resources.time_min * 60.0 * (profile.requeue.max_num_timeout + 1) + QUEUE_ALLOWANCE_S


async def submit_with_retries(stage: str, spec: StageSpec, resources: Resources, profile: Profile,
                              log: logging.Logger | logging.LoggerAdapter) -> Job:
    delays = iter(RETRY_DELAYS_S)
    while True:
        try:
            if profile.executor == "inline":  # in this thread: the engine may set signal handlers
                return submit(stage, spec, resources, profile)
            return await asyncio.to_thread(submit, stage, spec, resources, profile)
        except LmforgeError:
            raise
        except Exception as exc:  # noqa: BLE001 - anything else may be transient
            delay = next(delays, None)
            if delay is None:
                raise
            log.warning("submitting %s failed (%s: %s); trying again in %.0f s", stage,
                        type(exc).__name__, redact_text(str(exc)), delay)
            await asyncio.sleep(delay)


async def wait_for(job: Job, timeout_s: float, log: logging.Logger | logging.LoggerAdapter) -> Manifest:
    """The job's manifest; a job we stop waiting for (timeout, cancelled flow) is cancelled."""
    log.info("%s: job %s, run folder %s", job.stage, job.id, job.run.root)
    try:
        return await job.wait(timeout_s, on_line=lambda line: log.info("%s", line))
    except (TimeoutError, asyncio.CancelledError):
        job.cancel()
        raise


async def stop(job: Job, log: logging.Logger | logging.LoggerAdapter,
               timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Cancel a job and wait until it has ended: whatever replaces it may then write where it
    wrote."""
    log.warning("%s: cancelling job %s (%s) before building again", job.stage, job.id, job.run.root)
    job.cancel()
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(job.done):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job.id} still {job.state} {timeout_s:.0f} s after scancel")
        await asyncio.sleep(2.0)
