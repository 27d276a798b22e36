"""Tests against a REAL Slurm cluster on this host, started by cluster/testcluster/start.sh.

The session fixture ``slurm_cluster`` (tests/conftest.py) runs start.sh and exports SLURM_CONF;
it stops the cluster at the end of the session if the session started it.

Every wait has a deadline (a lost job must fail the test, never hang it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

submitit = pytest.importorskip("submitit")

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# The job functions below live in this test module, which the job's Python cannot import (tests/
# is not on its path): let cloudpickle ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------- helpers
def _run(*cmd: str, timeout: float = 30) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def _executor(folder: Path, **params):
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(slurm_partition="debug", timeout_min=5, cpus_per_task=1, **params)
    return executor


def _describe(job) -> str:
    try:
        return f"state {job.watcher.get_state(job.job_id, mode='force')}\nstderr:\n{job.stderr()}"
    except Exception as e:  # noqa: BLE001 - only for the failure message
        return f"(no details: {e})"


def _wait_done(job, timeout_s: float) -> float:
    """Poll (sacct forced each second) until the job is finished; cancel it and fail on timeout."""
    t0 = time.monotonic()
    while not job.done(force_check=True):
        if time.monotonic() - t0 > timeout_s:
            info = _describe(job)
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not finished after {timeout_s}s: {info}", pytrace=False)
        time.sleep(1)
    return time.monotonic() - t0


def _wait_state(job, wanted: str, timeout_s: float) -> None:
    t0 = time.monotonic()
    while (state := job.watcher.get_state(job.job_id, mode="force")) != wanted:
        if time.monotonic() - t0 > timeout_s:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} still {state}, not {wanted}, after {timeout_s}s", pytrace=False)
        time.sleep(0.5)


# ---------------------------------------------------------------- job functions (run on the nodes)
def _allreduce_rank() -> dict:
    import datetime

    import torch
    import torch.distributed as dist

    dist_env = submitit.helpers.TorchDistributedEnvironment().export()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        value = torch.tensor([float(dist_env.rank)])
        dist.all_reduce(value)  # default op: SUM
        return {
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "sum": value.item(),
            "master_addr": os.environ["MASTER_ADDR"],
            "node": os.environ.get("SLURMD_NODENAME"),
            "local_rank": dist_env.local_rank,
        }
    finally:
        dist.destroy_process_group()


def _sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


def _boom() -> None:
    raise ValueError("boom")


# ---------------------------------------------------------------- tests
def test_sinfo_two_idle_nodes(slurm_cluster):
    deadline = time.monotonic() + 30  # a job left by an earlier module may still be finishing
    while True:
        out = _run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %P %t")
        rows = sorted(line.split() for line in out.splitlines())
        if rows == [["n1", "debug*", "idle"], ["n2", "debug*", "idle"]] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert rows == [["n1", "debug*", "idle"], ["n2", "debug*", "idle"]], out


@pytest.mark.timeout(150)
def test_two_node_gloo_allreduce_through_submitit(slurm_cluster, tmp_path):
    executor = _executor(tmp_path, nodes=2, tasks_per_node=2)
    job = executor.submit(_allreduce_rank)
    _wait_done(job, 120)
    results = job.results()  # one per task
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    assert {r["world_size"] for r in results} == {4}
    assert {r["sum"] for r in results} == {6.0}  # 0+1+2+3 on every rank
    assert {r["master_addr"] for r in results} == {"n1"}  # the first node's name
    assert sorted(r["node"] for r in results) == ["n1", "n1", "n2", "n2"]
    assert sorted(r["local_rank"] for r in results) == [0, 0, 1, 1]


@pytest.mark.timeout(120)
def test_scancel_makes_result_raise(slurm_cluster, tmp_path):
    executor = _executor(tmp_path, nodes=1, tasks_per_node=1)
    job = executor.submit(_sleep, 300)
    _wait_state(job, "RUNNING", 60)
    _run("scancel", job.job_id)
    t0 = time.monotonic()
    _wait_done(job, 30)
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()  # no result file: submitit waits its 15 s grace period, then raises
    assert time.monotonic() - t0 < 40


@pytest.mark.timeout(120)
def test_exception_in_job_reaches_caller(slurm_cluster, tmp_path):
    executor = _executor(tmp_path, nodes=1, tasks_per_node=1)
    job = executor.submit(_boom)
    _wait_done(job, 90)
    with pytest.raises(submitit.core.utils.FailedJobError) as excinfo:
        job.result()
    text = str(excinfo.value)
    assert "boom" in text and "ValueError" in text, text
    _wait_state(job, "FAILED", 30)  # the result file can be there before slurmdbd records the end
