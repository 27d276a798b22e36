"""The caller's handle on a submitted stage: state, waiting, logs, cancellation, result.

State comes from Slurm's accounting (sacct, through submitit's watcher) for Slurm jobs, from the
controller process for local ones, and is fixed for inline runs. Rank 0's result file settles a
job as soon as it exists; otherwise only a final accounting state does. Every wait has a timeout,
and a job that ends without a result raises `JobFailed` with the real cause: the failing rank's
traceback, ranks lost with their node (lost.json, cluster/liveness.py), or Slurm's reason
(OUT_OF_MEMORY, TIMEOUT, NODE_FAIL, CANCELLED, ...). A job Slurm put back in its queue (after a
node failure) is in progress, whatever accounting says of its ended attempt.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import submitit
from submitit.core.utils import FailedJobError

from cluster.attempts import Attempt, read_attempts
from cluster.layout import RunDir
from cluster.logs import LogFollower, tail
from engine.manifest import Manifest
from engine.redact import redact_text

# Slurm states of a job that may still run (or run again); anything else is final.
IN_PROGRESS = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
               "SUSPENDED", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "PREEMPTED",
               "READY", "UNKNOWN"}
REQUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RUNNING"}
PREEMPTED_FINAL_AFTER_S = 60  # PREEMPTED for this long: Slurm cancelled it rather than requeue
REASONS = {"OUT_OF_MEMORY": "a rank ran out of memory", "TIMEOUT": "the time limit was reached",
           "NODE_FAIL": "a node failed", "CANCELLED": "cancelled",
           "PREEMPTED": "preempted and not requeued", "BOOT_FAIL": "a node failed to boot",
           "DEADLINE": "its deadline passed"}
SACCT_MIN_INTERVAL_S = 1.0
LOCAL_POLL_S, SLURM_POLL_S = 0.2, 2.0  # waits' default pause between two looks at a job
# submitit's watcher (one per process, shared by all jobs) is not thread-safe, and waits poll
# from worker threads
_WATCHER_LOCK = threading.Lock()


class JobFailed(RuntimeError):
    """A job ended without a result; the message carries the cause (URL passwords masked: it
    ends up in the flow's log and in MLflow)."""

    def __init__(self, message: str, job_id: str, state: str, rank: int | None = None) -> None:
        super().__init__(redact_text(message))
        self.job_id, self.state, self.rank = job_id, state, rank


class Job:
    def __init__(self, run: RunDir, stage: str, executor: str,
                 submitted: submitit.Job | None = None,
                 inline: tuple[str, Manifest | None, BaseException | None] | None = None) -> None:
        self.run, self.stage, self.executor = run, stage, executor
        self._sub = submitted
        self._inline = inline  # (state, manifest, error) of a run that already happened
        self._follower = LogFollower(run.rank_log(0))
        self._cancelled = False
        self._outcome: tuple[str, object] | None = None
        self._sacct: tuple[float, str] = (float("-inf"), "UNKNOWN")
        self._preempted_since: float | None = None
        self._lost_told: int | None = None  # the attempt whose lost ranks were reported
        self._pending_told = False  # the job's wait in Slurm's queue was reported

    @classmethod
    def attach(cls, run_dir: str | Path) -> "Job | None":
        """The Job of an earlier submission, from its run folder: a Slurm job outlives the process
        that submitted it, and another can follow it. None for local jobs (they end with their
        submitter) and for folders without a job."""
        run = RunDir(Path(run_dir))
        record = run.read_json(run.job)
        if not record or record.get("executor") != "slurm":
            return None
        return cls(run, record["stage"], "slurm",
                   submitted=submitit.SlurmJob(run.submitit, record["job_id"]))

    def __repr__(self) -> str:
        return f"Job({self.id}, {self.stage}, {self.executor}, {self.run.root})"

    @property
    def id(self) -> str:
        return self._sub.job_id if self._sub is not None else f"inline-{self.run.root.name}"

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, PREEMPTED, OUT_OF_MEMORY, ..."""
        if self._inline is not None:
            return self._inline[0]
        outcome = self._rank0_outcome()
        if self.executor == "local":
            if not self._sub.done():
                return "RUNNING"
            if outcome and outcome[0] == "success" and not self.run.failed.exists():
                return "COMPLETED"
            return "CANCELLED" if self._cancelled else "FAILED"
        state = self._slurm_state()
        if state in IN_PROGRESS and outcome is not None:  # accounting lags the result file
            return "COMPLETED" if outcome[0] == "success" else "FAILED"
        return state

    def done(self) -> bool:
        if self._inline is not None:
            return True
        if self.executor == "local":
            return self._sub.done()
        state = self.state
        if state == "PREEMPTED":
            self._preempted_since = self._preempted_since or time.monotonic()
            return time.monotonic() - self._preempted_since > PREEMPTED_FINAL_AFTER_S
        self._preempted_since = None
        return state not in IN_PROGRESS

    def _slurm_state(self) -> str:
        fetched, state = self._sacct
        if time.monotonic() - fetched >= SACCT_MIN_INTERVAL_S:
            with _WATCHER_LOCK:
                raw = self._sub.watcher.get_state(self._sub.job_id, mode="force")
            state = (raw.split() or ["UNKNOWN"])[0]  # "CANCELLED by 0" -> CANCELLED
            if state not in IN_PROGRESS and state != "COMPLETED":
                state = _requeued_state(self._sub.job_id) or state
            self._sacct = (time.monotonic(), state)
        return state

    def _rank0_outcome(self) -> tuple[str, object] | None:
        """("success", manifest) or ("error", trace) from rank 0's result file, once it exists."""
        if self._outcome is None:
            task = self._sub.task(0)
            if task.paths.result_pickle.exists():
                try:
                    self._outcome = ("success", task.result())
                except FailedJobError as exc:
                    self._outcome = ("error", str(exc))
        return self._outcome

    # ------------------------------------------------------------------ waiting
    def _poll(self, read_lines: bool) -> tuple[bool, list[str]]:
        done = self.done()
        return done, (list(self.log_lines()) if read_lines else [])  # after done: no line lost

    def _news(self) -> list[str]:
        """What no log of rank 0 says: that the job waits in Slurm's queue, and why (once per
        wait), and peers lost (lost.json, which a survivor writes within seconds), once per
        attempt."""
        return self._pending_news() + self._lost_news()

    def _pending_news(self) -> list[str]:
        pending = self.executor == "slurm" and self._slurm_state() == "PENDING"
        if not pending or self._pending_told:
            self._pending_told = pending
            return []
        reason = subprocess.run(["squeue", "-h", "-j", self.id, "-o", "%r"], capture_output=True,
                                text=True, timeout=30).stdout.strip()
        if reason in ("", "None"):  # not yet looked at by the scheduler: nothing to tell yet
            return []
        self._pending_told = True
        return [f"[cluster] job {self.id} is waiting in Slurm's queue (reason: {reason})"]

    def _lost_news(self) -> list[str]:
        lost = self.run.read_json(self.run.lost)
        if not lost or lost["attempt"] == self._lost_told:
            return []  # several survivors may write it: one line per attempt
        self._lost_told = lost["attempt"]
        then = ("Slurm requeues the job once it declares the node down" if self.executor == "slurm"
                else "the job fails")
        return [f"[cluster] job {self.id}, attempt {lost['attempt']}: {lost['message']}; {then}"]

    def _pause(self, deadline: float, poll_s: float | None, timeout_s: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {self.id} ({self.stage}) still {self.state} after "
                               f"{timeout_s:.0f} s; it keeps running (cancel() stops it)")
        # a local job's state is its process's: asking costs nothing, unlike a call to sacct
        return min(poll_s or (LOCAL_POLL_S if self.executor == "local" else SLURM_POLL_S), left)

    async def wait(self, timeout_s: float, on_line: Callable[[str], None] | None = None,
                   poll_s: float | None = None) -> Manifest:
        """Wait for the job without holding a thread (each poll borrows one for its sacct call);
        pass rank 0's new log lines to `on_line`. Returns the manifest; raises JobFailed, or
        TimeoutError after `timeout_s` (the job keeps running)."""
        deadline = time.monotonic() + timeout_s
        while True:
            done, lines = await asyncio.to_thread(self._poll, on_line is not None)
            for line in lines:
                on_line(line)
            if done:
                return await asyncio.to_thread(self.result)
            await asyncio.sleep(self._pause(deadline, poll_s, timeout_s))

    def wait_sync(self, timeout_s: float, on_line: Callable[[str], None] | None = None,
                  poll_s: float | None = None) -> Manifest:
        """`wait` for callers without an event loop."""
        deadline = time.monotonic() + timeout_s
        while True:
            done, lines = self._poll(on_line is not None)
            for line in lines:
                on_line(line)
            if done:
                return self.result()
            time.sleep(self._pause(deadline, poll_s, timeout_s))

    # ------------------------------------------------------------------ logs, attempts, control
    def log_lines(self) -> Iterator[str]:
        """Rank 0's log lines written since the last call (all attempts, one file), and news
        of ranks lost."""
        yield from self._follower.read_new()
        yield from self._news()

    def log_tail(self, n: int = 20, rank: int = 0) -> list[str]:
        return tail(self.run.rank_log(rank), n)

    @property
    def attempts(self) -> list[Attempt]:
        return read_attempts(self.run)

    def cancel(self) -> None:
        """scancel (Slurm) or stop the processes (local); an inline run is already over."""
        if self._sub is not None:
            self._cancelled = True
            self._sub.cancel(check=False)

    # ------------------------------------------------------------------ result
    def result(self) -> Manifest:
        """The manifest of a completed job; JobFailed with the cause otherwise."""
        if self._inline is not None:
            state, manifest, error = self._inline
            if manifest is None:
                raise JobFailed(f"{self.stage} ({self.id}) {state}: {error}", self.id, state,
                                0) from error
            return manifest
        if not self.done():
            raise RuntimeError(f"job {self.id} is still {self.state}: wait for it first")
        outcome = self._rank0_outcome()
        if outcome and outcome[0] == "success" and not self.run.failed.exists():
            return outcome[1]
        raise self._failure(outcome)

    def _failure(self, outcome: tuple[str, object] | None) -> JobFailed:
        state = self.state
        head = f"job {self.id} ({self.stage}) {state}"
        failed = self.run.read_json(self.run.failed)
        if failed:
            return JobFailed(f"{head}: rank {failed['rank']} on {failed['host']}: the engine exited "
                             f"with {failed['exit']}; the end of {failed['log']}:\n"
                             + "\n".join(failed["tail"]), self.id, state, failed["rank"])
        lost = self.run.read_json(self.run.lost)
        if lost and lost["attempt"] == len(self.attempts):
            return JobFailed(f"{head}: {lost['message']}", self.id, state, lost["ranks"][0])
        if outcome and outcome[0] == "error":
            return JobFailed(f"{head}:\n{outcome[1]}", self.id, state, 0)
        parts = [f"{head}: {REASONS.get(state, 'it ended without a result')}"]
        slurm_says = tail(self._sub.task(0).paths.stderr, 5)
        if slurm_says:
            parts += ["the end of the job's own log:", *slurm_says]
        engine_says = self.log_tail(10)
        if engine_says:
            parts += ["the end of rank 0's engine log:", *engine_says]
        return JobFailed("\n".join(parts), self.id, state)


def _requeued_state(job_id: str) -> str | None:
    """Slurm's live state of a job it put back in the queue, or None. After a node failure
    accounting shows the ended attempt (NODE_FAIL) until the requeued job is eligible again
    (minutes), while the job is PENDING in slurmctld's queue."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    state = out.stdout.strip()
    return state if state in REQUEUED else None
