"""Faults around the orchestration, with real servers (scripts/server.sh) and the real Slurm test
cluster (fixture `slurm_cluster`): the MLflow server stopped and restarted while a job trains,
two flows in separate processes racing for one artifact, the Prefect worker killed mid-flow, a
node lost under a 2-node job. Every wait has a deadline; what a test breaks (a server, a node) it
restores in a `finally`, so later tests find the cluster as it was."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.settings import PREFECT_API_URL, temporary_settings

from conftest import REPO, TINY_MODEL
from tasks.artifact import ArtifactRef
from tasks.metrics import step_series
from tasks.stage import run_stage
from test_servers import SERVER, _free_port, _server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    yield from _server("prefect", tmp_path_factory.mktemp("prefect-server"))


@pytest.fixture
def home(tmp_path, monkeypatch, prefect_server):
    """LMFORGE_HOME in a temporary folder; flows of this process report to the real server."""
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LMFORGE_CLUSTER_PROFILE", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        yield tmp_path / "home"


@flow
async def one_stage(stage: str, spec: dict, profile: str) -> ArtifactRef:
    return await run_stage(stage, spec, profile=profile)


def train_spec(dataset: str, iters: int, log_interval: int, interval: int) -> dict:
    """A tiny pretrain; its output (checkpoint.save) is placed by the task."""
    return {"model": TINY_MODEL, "data": {"blend": [dataset], "split": "95,5,0", "seq_length": 32},
            "checkpoint": {"interval": interval, "keep_last": 1}, "iters": iters,
            "micro_batch_size": 2, "global_batch_size": 8, "precision": "fp32",
            "optim": {"lr": 3e-3, "warmup_iters": 3, "min_lr": 3e-4},
            "log_interval": log_interval, "device": "cpu"}


def logged_steps(path: Path) -> list[tuple[int, float]]:
    """(step, time) of each complete metrics line of a metrics.jsonl (none before it exists)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines(keepends=True):
        record = json.loads(line) if line.endswith("\n") else {}
        if record.get("kind") == "metrics":
            out.append((record["step"], record["time"]))
    return out


def until(what: str, condition, timeout_s: float, every_s: float = 0.2):
    """Poll `condition()` until it returns something true; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout_s:.0f} s")
        time.sleep(every_s)
    return value


def last_step(home: Path, stage: str) -> int:
    """The latest step logged by the one `stage` artifact being built under `home`."""
    files = list((home / "artifacts" / stage).glob("*/metrics.jsonl"))
    return max((s for f in files for s, _ in logged_steps(f)), default=0)


# ---------------------------------------------------------------- MLflow server down mid-run
def mlflow_server(action: str, state: Path, port: int | None = None) -> str:
    args = ["bash", str(SERVER), "mlflow", action, str(state)] + ([str(port)] if port else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1].split("=", 1)[1] if action == "start" else ""


def outage(home: Path, state: Path, port: int, times: dict) -> None:
    """Stop the MLflow server once the job has logged 50 steps, start it again (same store, same
    port) once 50 more steps have been logged meanwhile; record when each happened."""
    try:
        until("step 50", lambda: last_step(home, "pretrain") >= 50, 120)
        times["stop"] = time.time()
        mlflow_server("stop", state)
        times["stopped"] = time.time()
        stopped_at = last_step(home, "pretrain")
        until("training while MLflow is down",
              lambda: last_step(home, "pretrain") >= stopped_at + 50, 60)
    except BaseException as exc:  # noqa: BLE001 - reported by the test, after the restart
        times["error"] = exc
    finally:
        times["restart"] = time.time()
        mlflow_server("start", state, port)
        times["up"] = time.time()


ITERS = 1500


@pytest.mark.timeout(300)
def test_mlflow_server_restarted_mid_run(slurm_cluster, tiny_dataset, home, tmp_path,
                                         monkeypatch):
    """Training goes on while the server is down (no step waits on it), and afterwards the run
    holds every step's metrics exactly once: live before and after the gap, backfilled from the
    JSON lines for the gap."""
    state, port = tmp_path / "mlflow", _free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server("start", state, port))
    times: dict = {}
    breaker = threading.Thread(target=outage, args=(home, state, port, times), daemon=True)
    breaker.start()
    try:
        ref = asyncio.run(one_stage("pretrain", train_spec(tiny_dataset, ITERS, 5, ITERS),
                                    "testcluster"))
        breaker.join(timeout=200)
        assert "error" not in times, times.get("error")
        series = step_series(Path(ref.path) / "metrics.jsonl")
        logged = logged_steps(Path(ref.path) / "metrics.jsonl")
        during = [t for _, t in logged if times["stopped"] <= t <= times["restart"]]
        assert len(during) >= 10, f"{len(during)} steps logged while MLflow was down"
        assert logged[-1][1] > times["up"], "training ended before the server was back"
        pauses = [b - a for a, b in zip(during, during[1:])]
        assert max(pauses) < 2.0, f"a step waited {max(pauses):.1f} s for the dead server"
        log = (Path(ref.job_dir) / "logs" / "rank_00000.log").read_text()
        assert "MLflow logging failed" in log

        mlflow = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
        assert mlflow.get_run(ref.mlflow_run_id).info.status == "FINISHED"
        for key, points in series.items():
            history = mlflow.get_metric_history(ref.mlflow_run_id, key)
            assert sorted(m.step for m in history) == sorted(points), key  # each step once
            assert {m.step: m.value for m in history} == {s: v for s, (v, _) in points.items()}
        assert sorted(series["loss"]) == list(range(5, ITERS + 1, 5))
        print(f"MLflow down {times['up'] - times['stop']:.1f} s (stop {times['stopped'] - times['stop']:.1f} s, "
              f"start {times['up'] - times['restart']:.1f} s); {len(during)} log steps meanwhile, "
              f"longest pause {max(pauses):.2f} s; training went on {logged[-1][1] - times['up']:.1f} s after")
    finally:
        breaker.join(timeout=200)
        mlflow_server("stop", state)


# ---------------------------------------------------------------- two flows, one artifact
RACER = """
import asyncio, json, sys
from prefect import flow
from tasks.stage import run_stage

@flow
async def racer(spec: dict):
    return await run_stage("generate-corpus", spec, profile="testcluster")

print("REF " + asyncio.run(racer(json.loads(sys.argv[1]))).model_dump_json())
"""


@pytest.mark.timeout(180)
def test_two_flow_processes_racing_build_once(slurm_cluster, home, prefect_server):
    """Two flow runs in two processes ask for the same artifact at the same moment: one Slurm job
    builds it, the other waits on the lease and gets the finished artifact."""
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "LMFORGE_HOME": str(home)}
    spec = json.dumps({"documents": 3000, "shards": 1})
    racers = [subprocess.Popen([sys.executable, "-c", RACER, spec], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
              for _ in range(2)]
    outputs = [racer.communicate(timeout=150)[0] for racer in racers]
    assert [r.returncode for r in racers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    refs = [ArtifactRef.model_validate_json(next(line[4:] for line in out.splitlines()
                                                 if line.startswith("REF "))) for out in outputs]
    assert sorted(ref.cached for ref in refs) == [False, True]
    assert refs[0].path == refs[1].path and refs[0].summary["documents"] == 3000
    assert len(list((home / "jobs").iterdir())) == 1
    assert any("is being built by" in out for out in outputs), "no racer waited on the lease"
    assert not list((home / "artifacts").rglob("*.lease"))
