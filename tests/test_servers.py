"""The orchestration against real servers, started by the project's own script (scripts/server.sh)
on 127.0.0.1: a Prefect server with the deployments of prefect.yaml (cron schedules, a worker
running a deployment), the demo's flows finding that server, an MLflow server receiving a stage's
params, step metrics, artifacts and registered model — and everything MLflow 3 shows of them:
experiment kind, system metrics, dataset inputs, logged models, version descriptions, lineage,
aliases and evaluations —, linked both ways with the Prefect server's flow runs, and a stage of a
flow run as a job on the Slurm test cluster."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.settings import PREFECT_API_URL, temporary_settings

from conftest import REPO
from engine.manifest import read_manifest
from flows.data_prep import data_prep
from flows.evaluate import evaluate
from flows.train import train
from tasks.artifact import ArtifactRef
from servers import PREFECT, cli, free_port, serving
from tasks.prefect_api import prefect_api
from tasks.stage import run_stage
from tasks.tracking import artifact_url
from test_flows import INLINE, SMALL_DATA, TINY_EVAL, TINY_TRAIN, flow_run_summary


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with serving("mlflow", tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


def _api(url: str, path: str, body: dict) -> list[dict]:
    response = httpx.post(f"{url}/{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def _runs(url: str, deployment_id: str, state: str) -> list[dict]:
    return _api(url, "flow_runs/filter", {
        "deployments": {"id": {"any_": [deployment_id]}},
        "flow_runs": {"state": {"type": {"any_": [state]}}}})


def test_deploy_schedule_and_worker_run(prefect_server, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "client"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "LMFORGE_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    cli(PREFECT, "work-pool", "create", "lmforge-local", "--type", "process", env=env, timeout=120)
    cli(PREFECT, "--no-prompt", "deploy", "--all", env=env, timeout=300)
    deployments = {d["name"]: d for d in _api(prefect_server, "deployments/filter", {})}
    assert set(deployments) == {"lifecycle-demo", "data-prep", "train", "evaluate", "compare",
                                "nightly-distill", "synthesize", "reshard", "compress",
                                "extend", "plan"}
    assert deployments["data-prep"]["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]

    nightly = deployments["nightly-distill"]["id"]
    deadline = time.monotonic() + 90
    while not (scheduled := _runs(prefect_server, nightly, "SCHEDULED")):
        assert time.monotonic() < deadline, "the cron schedule created no runs"
        time.sleep(2)
    assert all(r["expected_start_time"][11:16] == "02:00" for r in scheduled)

    params = json.dumps({"data": SMALL_DATA, "run": INLINE})
    cli(PREFECT, "deployment", "run", "data_prep/data-prep", "--params", params, env=env, timeout=120)
    cli(PREFECT, "worker", "start", "--pool", "lmforge-local", "--run-once", env=env, timeout=400)
    done = _runs(prefect_server, deployments["data-prep"]["id"], "COMPLETED")
    assert len(done) == 1
    assert {"lmforge", "data_prep", "profile:inline"} <= set(done[0]["tags"])  # deployment's, flow's
    assert list((tmp_path / "home" / "artifacts" / "merge").glob("*/data.manifest.json"))


def test_demos_prefect_server(prefect_server, prefect_server_home, tmp_path, monkeypatch):
    """Where `python -m flows.lifecycle` reports (tasks/prefect_api.py): PREFECT_API_URL, else
    the server scripts/server.sh runs under LMFORGE_HOME if it answers, else a temporary one."""
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), prefect_api() as where:
        assert where == "the server at http://127.0.0.1:9/api (PREFECT_API_URL)"
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        monkeypatch.setenv("LMFORGE_HOME", str(prefect_server_home))
        with prefect_api() as where:
            assert where.startswith(f"the server at {prefect_server} (scripts/server.sh")
            assert PREFECT_API_URL.value() == prefect_server
        monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
        (tmp_path / "servers" / "prefect").mkdir(parents=True)  # a server gone, its URL left
        (tmp_path / "servers" / "prefect" / "server.url").write_text(
            f"http://127.0.0.1:{free_port()}/api\n")
        with prefect_api() as where:
            assert where.startswith("a temporary server") and PREFECT_API_URL.value() is None


def test_flows_on_the_demos_prefect_server_tracked_on_mlflow_server(
        prefect_server, prefect_server_home, mlflow_server, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(prefect_server_home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("LMFORGE_CLUSTER_PROFILE", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # the job samples often
    mlflow = MlflowClient(mlflow_server)
    mlflow.create_experiment("train")  # as an older lmforge left it: no experiment kind
    with temporary_settings(restore_defaults={PREFECT_API_URL}), prefect_api():
        data = asyncio.run(data_prep(SMALL_DATA, INLINE))
        refs = asyncio.run(train(dataset=data["merge"].path, tokenizer=data["train-tokenizer"].path,
                                 training=TINY_TRAIN, register_as="server-tiny",
                                 run={"profile": "local"}))
        parent = mlflow.get_run(mlflow.get_run(refs["pretrain"].mlflow_run_id)
                                .data.tags["mlflow.parentRunId"])
        flow_run_id = parent.data.tags["prefect.flow_run_id"]
        tags, (summary,) = flow_run_summary(flow_run_id, "train-summary")
    # links both ways: the MLflow parent run to its Prefect flow run, Prefect's summary of that
    # flow run to the parent run and to the model version it registered
    assert parent.data.tags["prefect.flow_run_url"] == (
        f"{prefect_server.removesuffix('/api')}/flow-runs/flow-run/{flow_run_id}")
    assert {"lmforge", "train", "profile:local"} <= tags
    experiment, run_id = parent.info.experiment_id, parent.info.run_id
    assert f"[MLflow parent run]({mlflow_server}/#/experiments/{experiment}/runs/{run_id})" \
        in summary.data
    assert f"[models:/server-tiny/1]({mlflow_server}/#/models/server-tiny/versions/1)" \
        in summary.data
    run = mlflow.get_run(refs["pretrain"].mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["iters"] == "20" and run.data.params["data.seq_length"] == "32"
    assert run.data.tags["mlflow.parentRunId"]
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")] == [5, 10, 15, 20]
    files = {f.path for f in mlflow.list_artifacts(run.info.run_id)}
    assert {"spec.json", "manifest.json", "plots", "metrics", "job"} <= files
    curve = next(f.path for f in mlflow.list_artifacts(run.info.run_id, "plots")
                 if f.path.endswith(".png"))
    served = httpx.get(artifact_url(run.info.run_id, curve))  # as Prefect's image artifacts
    assert served.content[:8] == b"\x89PNG\r\n\x1a\n", served.text[:300]
    log = Path(refs["pretrain"].job_dir) / "logs" / "rank_00000.log"
    assert "MLflow logging failed" not in log.read_text()  # the job logged live, without conflict
    (version,) = mlflow.search_model_versions("name = 'server-tiny'")
    assert version.tags["lmforge.path"] == refs["convert"].path
    _check_records(mlflow, data, refs)
    _check_lineage(mlflow, data)


def _check_records(mlflow: MlflowClient, data: dict, refs: dict) -> None:
    """What MLflow 3's UI shows of a training flow: a model-training experiment, the job's system
    metrics, the dataset read, the checkpoint and the HF export as logged models, a registered
    version linked to its logged model, with a description, lineage tags and an alias."""
    kind = mlflow.get_experiment_by_name("train").tags  # found without the tag: given it
    assert kind["mlflow.experimentKind"] == "custom_model_development"
    run = mlflow.get_run(refs["pretrain"].mlflow_run_id)
    assert "system/cpu_utilization_percentage" in run.data.metrics  # sampled in the job
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    (read,) = run.inputs.dataset_inputs
    assert read.dataset.digest == data["merge"].fingerprint[:36]
    assert json.loads(read.dataset.source)["uri"] == data["merge"].path
    assert {t.key: t.value for t in read.tags}["mlflow.data.context"] == "training"
    assert "iterations" not in run.data.metrics and run.data.params["artifact.iterations"] == "20"

    (built,) = run.outputs.model_outputs
    checkpoint = mlflow.get_logged_model(built.model_id)
    assert checkpoint.source_run_id == run.info.run_id
    assert checkpoint.tags["lmforge.path"] == refs["pretrain"].path
    assert {m.key for m in checkpoint.metrics} >= {"loss", "valid_loss"}
    assert not mlflow.list_logged_model_artifacts(checkpoint.model_id)  # no weights copied
    convert = mlflow.get_run(refs["convert"].mlflow_run_id)
    assert [m.model_id for m in convert.inputs.model_inputs] == [checkpoint.model_id]
    (exported,) = convert.outputs.model_outputs

    version = mlflow.get_model_version_by_alias("server-tiny", "latest-train")
    assert version.version == "1"
    model = mlflow.get_logged_model(exported.model_id)  # the version on its logged model's page
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "server-tiny",
                                                               "version": 1}]
    assert version.source == model.artifact_location  # a server takes no source outside it
    assert version.tags["lmforge.data_fingerprint"] == data["merge"].fingerprint
    assert version.tags["lmforge.train_run"] == run.info.run_id
    assert "pretrain: 20 iterations" in version.description and "from scratch" in version.description
    parent = mlflow.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["train/loss"] == pytest.approx(refs["pretrain"].summary["loss"])


def _check_lineage(mlflow: MlflowClient, data: dict) -> None:
    """A nightly finetune of `models:/NAME/latest` records the version it started from; the new
    version says so and takes the alias; an evaluation of it lands on the version."""
    nightly = asyncio.run(train(dataset=data["merge"].path, tokenizer=data["train-tokenizer"].path,
                                base_model="models:/server-tiny/latest", training=TINY_TRAIN,
                                register_as="server-tiny", aliases=["nightly"], run=INLINE))
    parent = mlflow.get_run(mlflow.get_run(nightly["finetune"].mlflow_run_id)
                            .data.tags["mlflow.parentRunId"])
    assert parent.data.params["base_model"] == "models:/server-tiny/1"
    first = mlflow.get_model_version("server-tiny", "1")
    imported = mlflow.get_run(nightly["convert (import)"].mlflow_run_id)
    (model,) = mlflow.search_logged_models(
        [e.experiment_id for e in mlflow.search_experiments()],
        f"tags.`lmforge.fingerprint` = '{first.tags['lmforge.fingerprint']}'")
    assert [m.model_id for m in imported.inputs.model_inputs] == [model.model_id]
    version = mlflow.get_model_version_by_alias("server-tiny", "nightly")
    assert version.version == "2" and version.tags["lmforge.base_model"] == "models:/server-tiny/1"
    assert "from models:/server-tiny/1" in version.description

    refs = asyncio.run(evaluate(model="models:/server-tiny@nightly", evaluation=TINY_EVAL,
                                run=INLINE))
    run = mlflow.get_run(refs["evaluate"].mlflow_run_id)
    assert mlflow.get_run(run.data.tags["mlflow.parentRunId"]).data.params["model"] == (
        "models:/server-tiny/2")
    assert mlflow.get_experiment_by_name("evaluate").tags["mlflow.experimentKind"] == (
        "custom_model_development")
    (evaluated,) = run.inputs.model_inputs
    assert json.loads(mlflow.get_logged_model(evaluated.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "server-tiny", "version": 2}]
    heldout = read_manifest(refs["evaluate"].path).inputs["ppl[0]"]
    contexts = {i.dataset.digest: {t.key: t.value for t in i.tags}["mlflow.data.context"]
                for i in run.inputs.dataset_inputs}
    assert contexts[heldout[:36]] == "evaluation"
    scores = {k for k in run.data.metrics if k.startswith("metrics.ppl/")}
    assert scores and scores <= {m.key for m in mlflow.get_logged_model(evaluated.model_id).metrics}
    tags = mlflow.get_model_version("server-tiny", "2").tags
    assert {f"eval.{k.removeprefix('metrics.')}" for k in scores} <= set(tags)
    assert tags["lmforge.eval_run"] == run.info.run_id


@flow
async def one_stage_on(profile: str, spec: dict) -> ArtifactRef:
    return await run_stage("generate-corpus", spec, profile=profile)


def test_stage_of_a_flow_on_the_slurm_cluster(slurm_cluster, home):
    ref = asyncio.run(one_stage_on("testcluster", {"documents": 20, "shards": 1}))
    job = json.loads((Path(ref.job_dir) / "job.json").read_text())
    assert job["executor"] == "slurm" and job["job_id"].isdigit()
    assert not ref.cached and ref.summary["documents"] == 20
    again = asyncio.run(one_stage_on("testcluster", {"documents": 20, "shards": 1}))
    assert again.cached and again.path == ref.path
    assert len(list((home / "jobs").iterdir())) == 1
