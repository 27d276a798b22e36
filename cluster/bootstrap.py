"""The job side of cluster/: what every task of a Slurm or local job runs.

submitit starts one task per rank and unpickles a `RankLauncher` in each. The launcher derives
the torch.distributed environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from
`submitit.JobEnvironment()` — one code path for Slurm and local — and runs the engine stage for
its rank as a child process (cluster/engine_process.py), then maps the child's exit status:

    0   rank 0 returns the manifest (with `summary.attempts` added), other ranks None;
    75  the engine got a stop signal and saved a checkpoint (engine.errors.Preempted): the job is
        being requeued — by submitit (USR2, see `checkpoint`) or by Slurm itself (SIGTERM on
        preemption or `scontrol requeue`) — and the next attempt resumes from that checkpoint;
    *   the rank failed: failed.json records it (first failure wins), the other ranks stop their
        engines at once instead of waiting in a collective, and the task raises with the tail of
        the engine's output (its traceback or error message) — unless the engine failed because
        peers vanished (their heartbeats stopped: cluster/liveness.py). Then no rank failed:
        lost.json names the peers and their nodes, and the job waits to be requeued by Slurm.

Requeue on USR2 (the time-limit warning, or a preemption notice): submitit's signal handler calls
`checkpoint()` on rank 0, which forwards the signal to the engine, waits (bounded) for it to save
and exit, and returns the same launcher for submitit to requeue. State lives on disk (checkpoint,
attempts.jsonl), never in the pickle, so every attempt runs the same command.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import submitit

from cluster.attempts import begin_attempt, node_name, read_attempts, record_stop, with_attempts
from cluster.container import Container
from cluster.engine_process import EngineProcess
from cluster.layout import RunDir
from cluster.liveness import LOST_AFTER_S, Heartbeat, silent_peers
from cluster.logs import tail
from engine.errors import Preempted
from engine.manifest import Manifest

log = logging.getLogger(__name__)
PORT_BASE, PORT_SPAN = 20000, 10000
ERROR_TAIL_LINES = 60
HEADER = "[cluster] rank"  # starts the first line of each attempt in a rank's log
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR2}  # a stop, not a crash
EARLY_SIGNAL_S = 90  # Slurm may send the time-limit warning up to a minute before it is due
# how long survivors of a lost node wait for Slurm to declare it down and requeue the job: its
# SlurmdTimeout (300 s by default) and a margin; a node that never goes down fails the job after
LOST_REQUEUE_WAIT_S = 900


def attempt_tail(path: Path) -> list[str]:
    """The last lines of a rank's log, from its latest attempt only."""
    lines = tail(path, ERROR_TAIL_LINES)
    starts = [i for i, line in enumerate(lines) if line.startswith(HEADER)]
    return lines[starts[-1]:] if starts else lines


def _another_failed(rank: int, run: RunDir) -> RuntimeError:
    return RuntimeError(f"rank {rank}: engine stopped because another rank failed "
                        f"(see {run.failed})")


def master_port(job_id: str) -> int:
    """A port every rank derives from the job id alone, in [20000, 30000): below Linux's ephemeral
    range (32768+), where the kernel picks ports for outgoing connections."""
    return PORT_BASE + zlib.crc32(job_id.encode()) % PORT_SPAN


def torch_environment(job: submitit.JobEnvironment) -> dict[str, str]:
    """torch.distributed's variables for this task; the master is the job's first host."""
    return {"RANK": str(job.global_rank), "LOCAL_RANK": str(job.local_rank),
            "WORLD_SIZE": str(job.num_tasks),
            "LOCAL_WORLD_SIZE": str(job.num_tasks // max(job.num_nodes, 1)),
            "MASTER_ADDR": job.hostnames[0], "MASTER_PORT": str(master_port(job.job_id))}


class RankLauncher(submitit.helpers.Checkpointable):
    def __init__(self, stage: str, run_dir: str, env: dict[str, str], cpus_per_task: int,
                 time_limit_s: int, signal_delay_s: int, checkpoint_dir: str | None,
                 artifact: str | None, container: Container | None = None,
                 gpus: bool = False) -> None:
        self.stage = stage
        self.run_dir = run_dir
        self.env = env
        self.cpus_per_task = cpus_per_task
        self.time_limit_s = time_limit_s
        self.signal_delay_s = signal_delay_s
        self.checkpoint_dir = checkpoint_dir  # a resumable stage's checkpoints (start steps)
        self.artifact = artifact              # where the manifest is rewritten with attempts
        self.container = container            # apptainer/podman: the engine runs in the image
        self.gpus = gpus
        self._reset()

    # Runtime state (the engine process, the attempt's start) never goes into the pickle that
    # submitit requeues: underscore attributes are dropped and start afresh.
    def _reset(self) -> None:
        self._child: EngineProcess | None = None
        self._started = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def _grace_s(self) -> float:
        """How long a stopping engine gets to save: until shortly before Slurm's kill."""
        return max(5.0, self.signal_delay_s - 15.0)

    def __call__(self) -> Manifest | None:
        job = submitit.JobEnvironment()
        rank, run = job.global_rank, RunDir(Path(self.run_dir))
        self._started = time.monotonic()
        header = f"{HEADER} {rank}/{job.num_tasks} on {node_name()}, job {job.job_id}"
        if rank == 0:
            attempt = begin_attempt(run, self.checkpoint_dir)
            header += (f": attempt {attempt.number} ({attempt.reason}), start step "
                       f"{attempt.start_step}")
        threads = os.environ.get("OMP_NUM_THREADS", str(self.cpus_per_task))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1", **self.env,
               **torch_environment(job)}
        heartbeat = Heartbeat(run, rank)
        try:
            return self._run_engine(job, run, env, header, heartbeat)
        finally:
            heartbeat.stop()

    def _run_engine(self, job: submitit.JobEnvironment, run: RunDir, env: dict[str, str],
                    header: str, heartbeat: Heartbeat) -> Manifest | None:
        rank = job.global_rank
        self._child = self._start_engine(job, run, env, header)
        try:
            code = self._child.wait(give_up=lambda: heartbeat.beat() or run.failed.exists())
        finally:  # also on KeyboardInterrupt (local cancel) and SystemExit (requeue)
            if self._child.returncode is None:
                self._child.kill()
        if code is None:
            raise _another_failed(rank, run)
        if code == 0:
            if rank != 0:
                return None
            manifest = Manifest.model_validate_json(self._child.stdout)
            return with_attempts(manifest, read_attempts(run), self.artifact)
        if code == Preempted.exit_code or -code in STOP_SIGNALS:
            return self._stopped_by_signal(rank, run)
        # a broken collective is also what a rank sees when a peer vanishes: tell the two apart
        lost = silent_peers(run, rank, job.num_tasks, heartbeat.beat)
        if lost is None:
            raise _another_failed(rank, run)
        if lost:
            return self._peers_lost(rank, run, lost, job.cluster)
        lines = attempt_tail(run.rank_log(rank))
        how = f"status {code}" if code > 0 else f"signal {signal.Signals(-code).name}"
        run.claim_failed({"rank": rank, "exit": how, "host": node_name(),
                          "log": str(run.rank_log(rank)), "tail": lines})
        raise RuntimeError(f"rank {rank}: the engine exited with {how}:\n" + "\n".join(lines))

    def _start_engine(self, job: submitit.JobEnvironment, run: RunDir, env: dict[str, str],
                      header: str) -> EngineProcess:
        args = [self.stage, "--config", str(run.spec)]
        log_path = run.rank_log(job.global_rank)
        if self.container is None or self.container.runtime == "pyxis":
            return EngineProcess([sys.executable, "-m", "engine", *args], env, log_path, header)
        name = f"lmforge-{job.job_id}-{job.global_rank}-{uuid.uuid4().hex[:8]}"
        command, env = self.container.engine_command(env, self.gpus, name)
        return EngineProcess([*command, *args], env, log_path, f"{header}, in {name}",
                             on_kill=lambda: self.container.kill(name))

    def _peers_lost(self, rank: int, run: RunDir, lost: list[dict[str, Any]], cluster: str) -> None:
        """Peers went silent: their node is lost (or their processes were killed), and this rank's
        engine stopped only because of it. Say so in lost.json — the caller reports it at once —
        and write no failure: on Slurm the job is requeued when Slurm declares the node down
        (`--requeue`), and the next attempt resumes from the last checkpoint."""
        who = ", ".join(f"rank {p['rank']} on {p['host']}" for p in lost)
        message = (f"{who}: no heartbeat for {LOST_AFTER_S:.0f} s (node lost, or its processes "
                   f"killed)")
        run.write_json(run.lost, {"attempt": len(read_attempts(run)), "seen_by": rank,
                                  "ranks": [p["rank"] for p in lost],
                                  "nodes": sorted({p["host"] for p in lost}), "message": message})
        log.warning("rank %d: %s", rank, message)
        if cluster == "slurm":  # Slurm's node-failure requeue ends this attempt meanwhile
            time.sleep(LOST_REQUEUE_WAIT_S)
        raise RuntimeError(f"rank {rank}: {message}")

    def _stopped_by_signal(self, rank: int, run: RunDir) -> None:
        """The engine stopped on a signal that submitit's handler did not see (Slurm's SIGTERM on
        preemption, `scontrol requeue` or scancel), or, on ranks > 0, on any stop signal; it
        saved a checkpoint, unless the signal came while it was still starting."""
        if rank != 0:
            raise SystemExit(0)  # leave quietly (no result file): rank 0 or Slurm requeues the job
        record_stop(run, "preempted")
        time.sleep(self._grace_s)  # Slurm's kill, or submitit's USR2 handler, ends us meanwhile
        raise RuntimeError("the engine stopped on a signal and saved a checkpoint, but the job was "
                           "not requeued; submit it again to resume")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit calls this on rank 0 when USR2 arrives: forward it to the engine, let it save
        (bounded), then requeue this same launcher."""
        elapsed = time.monotonic() - self._started
        near_limit = elapsed >= self.time_limit_s - self.signal_delay_s - EARLY_SIGNAL_S
        if self._child is not None and self._child.returncode is None:
            self._child.send_signal(signal.SIGUSR2)
            if self._child.wait(self._grace_s) is None:
                log.warning("the engine did not stop within %.0f s; requeuing anyway (it resumes "
                            "from its last complete checkpoint)", self._grace_s)
        record_stop(RunDir(Path(self.run_dir)), "timeout" if near_limit else "preempted")
        return super().checkpoint(*args, **kwargs)
