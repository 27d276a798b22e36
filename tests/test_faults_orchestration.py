"""Faults around the orchestration, with real servers (scripts/server.sh) and the real Slurm test
cluster (fixture `slurm_cluster`): the MLflow server stopped and restarted while a job trains,
two flows in separate processes racing for one artifact, the Prefect worker killed mid-flow, a
node lost under a 2-node job. Every wait has a deadline; what a test breaks (a server, a node) it
restores in a `finally`, so later tests find the cluster as it was."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect import flow

from cluster.submit import submit
from conftest import REPO, TINY_MODEL
from flows.lifecycle import lifecycle
from servers import PREFECT, cli, free_port, kill_worker, parent_pid, running, server, until
from tasks import tracking
from tasks.artifact import ArtifactRef
from tasks.metrics import step_series
from tasks.stage import run_stage
from test_cluster import _restart_requeued

pytestmark = pytest.mark.slow


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




def last_step(home: Path, stage: str) -> int:
    """The latest step logged by the one `stage` artifact being built under `home`."""
    files = list((home / "artifacts" / stage).glob("*/metrics.jsonl"))
    return max((s for f in files for s, _ in logged_steps(f)), default=0)


# ---------------------------------------------------------------- MLflow server down mid-run
def outage(home: Path, state: Path, port: int, times: dict) -> None:
    """Stop the MLflow server once the job has logged 50 steps, start it again (same store, same
    port) once 50 more steps have been logged meanwhile; record when each happened."""
    try:
        until("step 50", lambda: last_step(home, "pretrain") >= 50, 120)
        times["stop"] = time.time()
        server("mlflow", "stop", state)
        times["stopped"] = time.time()
        stopped_at = last_step(home, "pretrain")
        until("training while MLflow is down",
              lambda: last_step(home, "pretrain") >= stopped_at + 50, 60)
    except BaseException as exc:  # noqa: BLE001 - reported by the test, after the restart
        times["error"] = exc
    finally:
        times["restart"] = time.time()
        server("mlflow", "start", state, port)
        times["up"] = time.time()


@pytest.mark.timeout(300)
def test_mlflow_server_restarted_mid_run(slurm_cluster, tiny_dataset, home, tmp_path,
                                         monkeypatch):
    """Training goes on while the server is down (no step waits on it), and afterwards the run
    holds every step's metrics exactly once: live before and after the gap, backfilled from the
    JSON lines for the gap."""
    state, port, iters = tmp_path / "mlflow", free_port(), 1500
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server("mlflow", "start", state, port))
    times: dict = {}
    breaker = threading.Thread(target=outage, args=(home, state, port, times), daemon=True)
    breaker.start()
    try:
        ref = asyncio.run(one_stage("pretrain", train_spec(tiny_dataset, iters, 5, iters),
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
        assert sorted(series["loss"]) == list(range(5, iters + 1, 5))
        print(f"MLflow down {times['up'] - times['stop']:.1f} s; {len(during)} log steps "
              f"meanwhile, longest pause {max(pauses):.2f} s; training went on "
              f"{logged[-1][1] - times['up']:.1f} s after")
    finally:
        breaker.join(timeout=200)
        server("mlflow", "stop", state)


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


# ---------------------------------------------------------------- the Prefect worker killed
def lifecycle_params(tiny_dataset: str) -> dict:
    """The lifecycle on the test cluster, from the tiny corpus and tokenizer: tokenize, merge,
    then a pretrain long enough to kill the flow in."""
    data = Path(tiny_dataset).parent
    options = {key: value for key, value in train_spec(tiny_dataset, 1000, 20, 400).items()
               if key != "data"}
    return {"data": {"corpus": str(data / "corpus"),
                     "tokenizer": str(data / "tok" / "tokenizer.model"),
                     "tokenize": {"append_eod": True, "progress": False}},
            "training": {"options": {**options, "data": {"split": "95,5,0", "seq_length": 32}},
                         "export": None},
            "evaluation": None, "register_as": None, "run": {"profile": "testcluster"}}


def training_started(home: Path) -> Path | None:
    """The run folder of the pretrain job once it logs training steps."""
    for run in (home / "jobs").glob("pretrain-*"):
        log = run / "logs" / "rank_00000.log"
        if log.is_file() and "iter " in log.read_text():
            return run
    return None




@pytest.mark.timeout(420)
def test_worker_killed_mid_flow_rerun_reuses_every_finished_stage(slurm_cluster, tiny_dataset,
                                                                  prefect_server, home):
    """A deployment's flow run dies with its worker (SIGKILL to the process groups of both) while
    its pretrain job runs on Slurm. Running the flow again finds tokenize and merge finished
    (cached, no job) and follows the pretrain job that outlived the flow instead of submitting
    another into the same checkpoint folder."""
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "LMFORGE_HOME": str(home),
           "PREFECT_HOME": str(home / "prefect-client"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    params = lifecycle_params(tiny_dataset)
    cli(PREFECT, "work-pool", "create", "lmforge-local", "--type", "process", env=env)
    cli(PREFECT, "--no-prompt", "deploy", "--name", "lifecycle-demo", env=env, timeout=300)
    cli(PREFECT, "deployment", "run", "lifecycle/lifecycle-demo", "--params", json.dumps(params),
        env=env)
    with open(home.parent / "worker.log", "wb") as log:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "lmforge-local",
                                   "--run-once"], cwd=REPO, env=env, stdout=log, stderr=log,
                                  start_new_session=True)
    try:
        until("pretrain training, or the end of the worker",
              lambda: training_started(home) or worker.poll() is not None, 300, 0.5)
    finally:
        kill_worker(worker)
    orphan = training_started(home)
    assert orphan, (home.parent / "worker.log").read_text()[-5000:]
    jobs = sorted(p.name for p in (home / "jobs").iterdir())
    assert [name.split("-")[0] for name in jobs] == ["merge", "pretrain", "tokenize"]

    rerun = time.monotonic()
    refs = asyncio.run(lifecycle(**params))
    assert refs["tokenize[0]"].cached and refs["merge"].cached
    assert not refs["pretrain"].cached and refs["pretrain"].job_dir == str(orphan)
    assert refs["pretrain"].summary["iterations"] == 1000
    assert sorted(p.name for p in (home / "jobs").iterdir()) == jobs  # nothing submitted again
    assert [a["number"] for a in refs["pretrain"].summary["attempts"]] == [1]
    run = tracking.client().get_run(refs["pretrain"].mlflow_run_id)  # the run the job logged to
    assert run.data.tags["lmforge.job_dir"] == str(orphan) and run.info.status == "FINISHED"
    assert "lmforge.error" not in run.data.tags
    assert not list((home / "artifacts").rglob("*.job.json"))
    print(f"re-run after the worker's death: {time.monotonic() - rerun:.0f} s, following the "
          f"pretrain job to its end")


# ---------------------------------------------------------------- a node lost
def daemon_pids(run_dir: Path) -> dict[str, int]:
    """The daemons start.sh recorded ("NAME PID EXE" lines): name -> pid."""
    lines = (run_dir / "pids").read_text().splitlines()
    return {line.split()[0]: int(line.split()[1]) for line in lines if line.strip()}


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)




def lose_node(run_dir: Path, node: str, job_id: str) -> list[int]:
    """What a node's power loss does to the job: SIGKILL its slurmd, the job's slurmstepd on it
    and every process of the job there (found by SLURMD_NODENAME and SLURM_JOB_ID); no process
    of the node gets a word out. Returns the pids killed."""
    mark = {"SLURMD_NODENAME": node, "SLURM_JOB_ID": job_id}.items()
    ranks = [int(p) for p in os.listdir("/proc") if p.isdigit() and mark <= _environ(int(p)).items()]
    stepds = {parent_pid(pid) for pid in ranks} - set(ranks)
    doomed = [daemon_pids(run_dir)[f"slurmd-{node}"], *stepds, *ranks]
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return doomed


def revive_node(run_dir: Path, node: str) -> None:
    """Start the node's slurmd again as start.sh does (its own session, recorded in `pids` so
    that stop.sh stops it) unless it runs, and wait until Slurm has the node back in service."""
    name = f"slurmd-{node}"
    if not running(daemon_pids(run_dir)[name]):
        with open(run_dir / "log" / f"{name}.out", "ab") as out:
            daemon = subprocess.Popen(["/usr/sbin/slurmd", "-D", "-N", node, "-f",
                                       os.environ["SLURM_CONF"]], stdin=subprocess.DEVNULL,
                                      stdout=out, stderr=out, start_new_session=True)
        lines = (run_dir / "pids").read_text().splitlines()
        (run_dir / "pids").write_text("".join(
            f"{name} {daemon.pid} {line.split()[2]}\n" if line.split()[0] == name else line + "\n"
            for line in lines))
    until(f"node {node} back in service", lambda: _in_service(node), 60, every_s=1)




def _in_service(node: str) -> bool:
    """ReturnToService=2 brings a node that registers again back by itself; a node still marked
    down although it answers (no `*`) is resumed by hand."""
    out = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True,
                         timeout=30)
    state = out.stdout.strip()
    if state.startswith(("down", "drain", "fail")) and "*" not in state:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"],
                       capture_output=True, timeout=30)
    return bool(state) and "*" not in state and not state.startswith(("down", "drain", "fail"))


def loss_records(save: Path) -> list[tuple[int, float]]:
    """(step, loss) of every metrics line, in the order written (a resumed attempt logs its
    steps again after the first attempt's)."""
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["data"]["loss"]) for r in records
            if r["kind"] == "metrics" and "loss" in r["data"]]


@pytest.mark.timeout(420)
def test_node_lost_is_reported_within_seconds_and_the_requeue_resumes(slurm_cluster, tiny_dataset,
                                                                      tmp_path):
    """n2 dies under a 2-node DDP job (its slurmd, slurmstepd and rank killed at once): the
    surviving rank's broken all-reduce is not taken for a failure of its own; the caller hears
    which rank and node were lost within seconds, keeps waiting while Slurm requeues the job
    (node failure, `--requeue`), and the next attempt resumes from the last checkpoint with the
    very same losses."""
    cluster, save = slurm_cluster["run_dir"], tmp_path / "ckpt"
    spec = {**train_spec(tiny_dataset, 400, 1, 100),
            "checkpoint": {"save": str(save), "interval": 100, "keep_last": 1}}
    job = submit("pretrain", spec, {"nodes": 2}, "testcluster", run_dir=tmp_path / "run")
    lines: list[str] = []
    try:
        until("step 130", lambda: max((s for s, _ in logged_steps(save / "metrics.jsonl")),
                                      default=0) >= 130, 120)
        lose_node(cluster, "n2", job.id)
        lost_at = time.monotonic()
        until("news of the lost node", lambda: lines.extend(job.log_lines()) or
              any("no heartbeat" in line for line in lines), 60)
        told_s = time.monotonic() - lost_at
        until("Slurm's requeue", lambda: job.state == "PENDING", 120, every_s=1)
        requeued_s = time.monotonic() - lost_at
        revive_node(cluster, "n2")
        _restart_requeued(job)
        manifest = job.wait_sync(180, on_line=lines.append, poll_s=1.0)
    finally:
        revive_node(cluster, "n2")
        job.cancel()

    news = next(line for line in lines if "no heartbeat" in line)
    assert f"job {job.id}, attempt 1: rank 1 on n2: no heartbeat" in news, news
    assert told_s < 20, f"the lost node was reported after {told_s:.0f} s"
    assert not (tmp_path / "run" / "failed.json").exists()  # no rank failed
    assert [(a.number, a.reason, a.start_step) for a in job.attempts] == [
        (1, "submitted", 0), (2, "requeued", 100)]
    assert manifest.summary["iterations"] == 400
    losses: dict[int, list[float]] = {}
    for step, loss in loss_records(save):
        losses.setdefault(step, []).append(loss)
    assert sorted(losses) == list(range(1, 401))
    redone = {step: values for step, values in losses.items() if len(values) > 1}
    assert min(redone) == 101 and len(redone) >= 30  # steps after the checkpoint, run twice ...
    assert all(a == b for a, b in redone.values())   # ... to bitwise the same loss
    print(f"node loss reported in {told_s:.1f} s; Slurm requeued the job after {requeued_s:.0f} s")
