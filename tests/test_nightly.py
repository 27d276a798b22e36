"""The nightly distillation on CPU with real models, through its deployment on a real Prefect
server with a worker: stories260K (HF) is the first night's student and the teacher; chunks of
Alice in Wonderland arrive in a drop folder; other chunks of it are the held-out text. Night 1
is killed mid-distill, then finishes from the cache and promotes its candidate (the book's
perplexity falls); night 2 finds no new shards and does nothing; night 3 makes its student
worse and is rejected, the champion staying. Promotion and failure reach a webhook. Bad inputs
are refused before any job."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefect import get_client

from conftest import REPO, shared
from engine.checkpoint.latest import LATEST
from engine.errors import InputError
from engine.manifest import read_manifest
from flows.nightly_distill import nightly_distill
from servers import PREFECT, cli, kill_worker, until
from test_flows import flow_run_summary
from tasks import tracking
from tasks.champion import history, history_chart
from tasks.models import NotRegistered
from tasks.watermark import consumed

NAME = "nightly-tiny"
TRAINING = {"options": {"data": {"seq_length": 128, "split": "100,0,0"}, "iters": 4,
                        "micro_batch_size": 2, "global_batch_size": 2, "precision": "fp32",
                        "optim": {"lr": 1e-3, "warmup_iters": 1}, "eval": {"interval": None},
                        "checkpoint": {"keep_last": 1}, "log_interval": 2},
            "distill": {"alpha": 0.5}}
SYNTHESIS = {"prefix_tokens": 32, "sampling": {"max_tokens": 32}, "backend": "engine",
             "progress": False}


def _chunks(paragraphs: int = 12) -> list[str]:
    text = shared("text", "gutenberg", "pg11.txt").read_text(encoding="utf-8")
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return ["\n\n".join(paras[i:i + paragraphs]) for i in range(0, len(paras), paragraphs)]


def _write(path, texts) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture
def nights(home, tmp_path):
    chunks = _chunks()
    drop = tmp_path / "drop"
    drop.mkdir()
    _write(drop / "day-1.jsonl", chunks[:16])
    _write(tmp_path / "heldout.jsonl", chunks[-8:])
    parent = shared("tiny-llama", "hf")
    evaluation = {"options": {"ppl": [str(tmp_path / "heldout.jsonl")], "windows": ["256"],
                              "fineval": str(shared("fineval", "academic")),
                              "fineval_subjects": ["finance"], "fineval_shots": [0],
                              "fineval_methods": ["answer"], "limit": 20, "progress": False}}
    args = {"drop": str(drop), "teacher": str(parent), "register_as": NAME,
            "bootstrap": str(parent), "synthesis": SYNTHESIS, "training": TRAINING,
            "evaluation": evaluation, "run": {"profile": "inline"}}
    return drop, chunks, args


class Webhook:
    """An HTTP endpoint on 127.0.0.1 keeping the JSON bodies POSTed to it: where the test's
    notification block sends."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def subjects(self, word: str) -> list[str]:
        return [m["subject"] for m in self.received if word in m["subject"]]


def _night(env: dict, params: dict, log: Path, kill_when=None) -> str:
    """One night through the deployment: `prefect deployment run`, then a worker that runs it
    (killed with its flow run once `kill_when()` holds). The flow run's id."""
    out = cli(PREFECT, "deployment", "run", "nightly-distill/nightly-distill", "--params",
              json.dumps(params), env=env)
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    with open(log, "ab") as f:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "lmforge-local",
                                   "--run-once"], cwd=REPO, env=env, stdout=f, stderr=f,
                                  start_new_session=True)
    try:
        if kill_when:
            until("the moment to kill", lambda: kill_when() or worker.poll() is not None, 300,
                  0.05)
            assert worker.poll() is None, "the night ended before it could be killed"
            kill_worker(worker)
        else:
            assert worker.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        if worker.poll() is None:
            kill_worker(worker)
    return run_id


def _flow_run(run_id: str) -> tuple[str, dict[str, str]]:
    """The flow run's state, and how its summary says each step came (built or cached)."""
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state.type.value
    _, summaries = flow_run_summary(run_id, "nightly-distill-summary")
    rows = re.findall(r"^\| ([^|]+) \| [^|]+ \| [^|]+ \| \[?(built|cached)",
                      summaries[0].data if summaries else "", re.M)
    return state, {step.strip(): how for step, how in rows}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_nights_through_the_deployment(nights, prefect_server, home, tmp_path):
    """The deployment run by a worker on the real server, notifications on: night 1 is killed
    mid-distill and run again: it finishes from the cache and promotes; night 2 has no new
    shards and does nothing; night 3 trains at a learning rate that harms the student: its
    version is rejected, the champion stays; a night that fails is announced as the promotion
    was."""
    drop, chunks, args = nights
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "LMFORGE_HOME": str(home),
           "PREFECT_HOME": str(tmp_path / "prefect-client"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    hook, log = Webhook(), tmp_path / "worker.log"
    cli(sys.executable, "-m", "tasks.notifications", "--webhook", hook.url, env=env)
    cli(PREFECT, "work-pool", "create", "lmforge-local", "--type", "process", env=env)
    cli(PREFECT, "--no-prompt", "deploy", "--name", "nightly-distill", env=env, timeout=300)
    mlflow = tracking.client()

    options = TRAINING["options"]
    long = {**args, "training": {**TRAINING, "options": {
        **options, "iters": 60, "checkpoint": {"interval": 10, "keep_last": 1}}}}
    checkpointed = lambda: list((home / "artifacts" / "distill").glob("*/" + LATEST))
    killed = _night(env, long, log, kill_when=checkpointed)
    assert _flow_run(killed)[0] == "RUNNING"  # as the server last heard of it
    first = _night(env, long, log)
    state, steps = _flow_run(first)
    assert state == "COMPLETED"
    assert {s for s, how in steps.items() if how == "cached"} >= {
        "synthesize", "new tokenize[0]", "new merge", "synthetic tokenize[0]", "synthetic merge",
        "convert (import)", "convert (teacher)"}, steps
    (distilled,) = (home / "artifacts" / "distill").glob("*/manifest.json")
    manifest = read_manifest(distilled.parent)
    assert [a["start_step"] for a in manifest.summary["attempts"]][-1] >= 10  # resumed
    blend = manifest.spec["data"]["blend"]
    assert blend[0] == "0.5" and blend[2] == "0.5"  # the new shards and their continuations
    champion = mlflow.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == "1" and "% required" in champion.tags["lmforge.promoted"]
    assert champion.tags["lmforge.teacher"] == args["teacher"]
    assert champion.tags["lmforge.shards"] == "day-1.jsonl"
    assert champion.tags["lmforge.base_model"] == args["bootstrap"]
    assert champion.tags["lmforge.flow_run"] == first
    (parent,) = mlflow.search_runs([tracking.experiment_id("nightly-distill")],
                                   f"tags.`prefect.flow_run_id` = '{first}'")
    for label in ("champion", "candidate"):  # FinEval beside the perplexity, for both
        assert any(m.startswith(f"{label}/fineval/0-shot/answer/") for m in parent.data.metrics)
    assert any(t.startswith("eval.fineval/0-shot/answer/") for t in champion.tags)
    (night,) = history(NAME)
    assert night["promote"] and night["candidate"] < night["champion"]
    assert any(m.startswith("fineval/") for m in night["figures"]["champion"])
    assert history_chart(history(NAME)).axes[1].get_title().startswith("fineval/0-shot/answer/")
    assert list(consumed(NAME)) == [str(drop / "day-1.jsonl")]

    second = _night(env, args, log)  # no new shards
    assert _flow_run(second) == ("COMPLETED", {})
    assert len(history(NAME)) == 1

    _write(drop / "day-3.jsonl", chunks[16:24])
    harsh = {**TRAINING, "options": {**options, "optim": {"lr": 0.05, "warmup_iters": 1}}}
    third = _night(env, {**args, "training": harsh}, log)  # a student made worse
    version = mlflow.search_model_versions(f"tags.`lmforge.flow_run` = '{third}'")[0].version
    rejected = mlflow.get_model_version(NAME, version)
    assert re.search(r": -\d+\.\d+% \(< the 0\.00% required\)", rejected.tags["rejected"]), \
        rejected.tags
    assert rejected.tags["lmforge.base_model"] == f"models:/{NAME}/1"
    assert str(mlflow.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert [n["promote"] for n in history(NAME)] == [True, False]
    assert sorted(consumed(NAME)) == [str(drop / "day-1.jsonl"), str(drop / "day-3.jsonl")]
    parents = mlflow.search_runs([tracking.experiment_id("nightly-distill")],
                                 "tags.`prefect.flow_run_id` != ''")
    assert len(parents) == 3  # the killed night's, and nights 1 and 3: none without data
    for run in parents:
        if run.data.tags["prefect.flow_run_id"] != killed:
            assert {"comparison.md", "champion_history.png"} <= {
                f.path for f in mlflow.list_artifacts(run.info.run_id)}

    _write(drop / "day-4.jsonl", chunks[24:28])
    failed = _night(env, {**args, "teacher": "models:/nope/1"}, log)
    assert _flow_run(failed)[0] == "FAILED"
    waited = time.monotonic()
    until("both notifications", lambda: hook.subjects("failed") and hook.subjects("champion"),
          120, 1)
    print(f"notifications {time.monotonic() - waited:.0f} s after the failed night")
    assert hook.subjects("champion") == [f"lmforge: {NAME} has a new champion"]
    promoted = next(m for m in hook.received if "champion" in m["subject"])
    assert promoted["body"].startswith("Version 1 promoted: ") and "day-1.jsonl" in promoted["body"]
    assert len(hook.subjects("failed")) == 1 and "failed" in hook.subjects("failed")[0]


def test_bad_inputs_are_refused_before_any_job(nights, tmp_path):
    drop, _, args = nights
    home_jobs = tmp_path / "home" / "jobs"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="folder has no"):
        asyncio.run(nightly_distill(**{**args, "drop": str(empty)}))
    with pytest.raises(NotRegistered, match=r"models:/nope/1: not in the MLflow registry"):
        asyncio.run(nightly_distill(**{**args, "teacher": "models:/nope/1"}))
    with pytest.raises(InputError, match="has no champion yet: give bootstrap"):
        asyncio.run(nightly_distill(**{**args, "bootstrap": None}))
    other = tmp_path / "other-tokenizer"  # stories260K with Llama-2's tokenizer files
    shutil.copytree(shared("tiny-llama", "hf"), other)
    for file in shared("tokenizers", "llama2").glob("tokenizer*"):
        shutil.copy(file, other / file.name)
    with pytest.raises(InputError, match="has another tokenizer than the student .*: logit KD "
                                         "needs one"):
        asyncio.run(nightly_distill(**{**args, "teacher": str(other)}))
    assert not home_jobs.exists()
