"""Flows and the stage task under Prefect's test harness: the cache (miss, hit, force), the lease,
parameters refused before any job, failures carrying the job's own error into the flow and into
MLflow, the lifecycle end to end with its MLflow layout, registry entry and Prefect artifacts.

Most flows use the `inline` profile (no job process: fast); the tests that need a real job (a
failing engine, two flows racing for one artifact) use `local`."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                            ArtifactFilterKey)
from prefect.exceptions import ParameterTypeError
from prefect.settings import PREFECT_UI_URL
from prefect.testing.utilities import prefect_test_harness
from prefect.utilities.callables import parameter_schema

from cluster.jobs import JobFailed
from cluster.profiles import ProfileError
from engine.errors import SpecError
from flows.compare import compare
from flows.compress import compress
from flows.extend import extend
from flows.data_prep import data_prep
from flows.evaluate import evaluate
from flows.lifecycle import lifecycle
from flows.reshard import reshard
from flows.train import train
from tasks import submission, tracking
from tasks.artifact import ArtifactRef
from tasks.lease import Lease
from tasks.stage import run_stage

SMALL_DATA = {"generate": {"documents": 300}, "train_tokenizer": {"vocab_size": 400},
              "tokenize": {"append_eod": True, "progress": False}}
TINY_TRAIN = {"options": {
    "model": {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
              "num_heads": 2, "num_kv_heads": 2, "max_position_embeddings": 64},
    "data": {"split": "90,10,0", "seq_length": 32}, "optim": {"lr": 3e-3, "warmup_iters": 2},
    "checkpoint": {"keep_last": 1}, "eval": {"interval": 10, "iters": 1}, "iters": 20,
    "micro_batch_size": 4, "global_batch_size": 4, "precision": "fp32", "log_interval": 5}}
TINY_EVAL = {"options": {"progress": False}, "heldout": {"documents": 30, "shards": 1, "seed": 7}}
INLINE = {"profile": "inline"}


@pytest.fixture(scope="session")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def home(tmp_path, monkeypatch, prefect_api):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LMFORGE_CLUSTER_PROFILE", raising=False)
    return tmp_path / "home"


@flow
async def one_stage(stage: str, spec: dict, profile: str, resources: dict | None = None) -> ArtifactRef:
    return await run_stage(stage, spec, resources=resources, profile=profile)


@flow
async def same_stage_twice(spec: dict) -> list[ArtifactRef]:
    return list(await asyncio.gather(run_stage("generate-corpus", spec, profile="local"),
                                     run_stage("generate-corpus", spec, profile="local")))


def job_dirs(home) -> list[str]:
    return sorted(p.name for p in (home / "jobs").iterdir()) if (home / "jobs").exists() else []


def flow_run_summary(flow_run_id: str, key: str) -> tuple[set[str], list]:
    """The flow run's tags, and its summary artifacts (`key`) read back from the Prefect API."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        summaries = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    return set(run.tags), summaries


def stage_runs(experiment: str) -> list:
    mlflow = tracking.client()
    exp = mlflow.get_experiment_by_name(experiment)
    return [r for r in mlflow.search_runs([exp.experiment_id], "tags.`lmforge.stage` != ''")]


def test_cache_miss_hit_and_force(home):
    first = asyncio.run(data_prep(SMALL_DATA, INLINE))
    assert set(first) == {"generate-corpus", "train-tokenizer", "tokenize[0]", "tokenize[1]", "merge"}
    assert not any(ref.cached for ref in first.values())
    assert first["merge"].path.startswith(str(home / "artifacts" / "merge"))
    assert first["merge"].summary["documents"] == 300
    jobs = job_dirs(home)
    assert len(jobs) == 5

    second = asyncio.run(data_prep(SMALL_DATA, INLINE))
    assert all(ref.cached for ref in second.values())
    assert {k: r.path for k, r in second.items()} == {k: r.path for k, r in first.items()}
    assert job_dirs(home) == jobs  # nothing submitted

    forced = asyncio.run(data_prep(SMALL_DATA, {**INLINE, "force": ["merge"]}))
    assert forced["merge"].cached is False and forced["tokenize[0]"].cached is True
    assert forced["merge"].fingerprint == first["merge"].fingerprint
    assert len(job_dirs(home)) == 6

    # MLflow: each flow run is a parent run, each stage a nested run; hits name their builder
    runs = stage_runs("data_prep")
    built = {r.info.run_id: r for r in runs if r.data.tags["lmforge.cached"] == "false"}
    hits = [r for r in runs if r.data.tags["lmforge.cached"] == "true"]
    assert len(built) == 6 and len(hits) == 9
    assert all(r.data.tags["lmforge.built_by"] in built for r in hits)
    assert all(r.info.status == "FINISHED" for r in runs)
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 3
    merge = next(r for r in built.values() if r.data.tags["lmforge.stage"] == "merge")
    assert merge.data.params["output_prefix"] == first["merge"].path
    assert merge.data.metrics["documents"] == 300


def test_bad_parameters_are_refused_before_any_job(home, tmp_path):
    bad = json.loads(json.dumps(TINY_TRAIN))
    bad["options"]["iters"] = -1
    with pytest.raises(ParameterTypeError, match="iters"):
        asyncio.run(lifecycle(data=SMALL_DATA, training=bad, run=INLINE))
    # a value only the engine's complete model refuses: caught by the flow's dry run
    hf = tmp_path / "model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(SpecError, match="fineval_shots"):
        asyncio.run(evaluate(model=str(hf), evaluation={"options": {"fineval_shots": [-1]}},
                             run=INLINE))
    assert not (home / "jobs").exists() and not (home / "artifacts").exists()


def test_training_layout_is_in_the_form_and_checked_before_any_job(home, tmp_path):
    form = parameter_schema(train).definitions["TrainOptions"]["properties"]
    typed = {name: form[name]["anyOf"][0] for name in
             ("tensor_parallel", "pipeline_parallel", "data_parallel_replicate", "data_parallel",
              "sequence_parallel", "recompute")}
    assert typed == {"tensor_parallel": {"type": "integer", "minimum": 1},
                     "pipeline_parallel": {"type": "integer", "minimum": 1},
                     "data_parallel_replicate": {"type": "integer", "minimum": 1},
                     "data_parallel": {"type": "string", "enum": ["ddp", "fsdp"]},
                     "sequence_parallel": {"type": "boolean"},
                     "recompute": {"type": "string", "enum": ["none", "selective", "full"]}}
    assert form["tensor_parallel"]["default"] is None  # the profile's, else 1: a form sends it

    def pretrain(profile="inline", **layout):
        training = {**TINY_TRAIN, "options": {**TINY_TRAIN["options"], **layout}}
        asyncio.run(train(dataset=str(tmp_path / "ds"), training=training,
                          run={"profile": profile}))

    with pytest.raises(ParameterTypeError, match="tensor_parallel"):
        pretrain(tensor_parallel=0)
    with pytest.raises(ParameterTypeError, match="recompute"):
        pretrain(recompute="most")
    with pytest.raises(SpecError, match="model num_heads 2 is not divisible by tensor_parallel 4"):
        pretrain(tensor_parallel=4)
    with pytest.raises(SpecError, match=r"pretrain on 1 rank\(s\): world size 1 is not a "
                                        r"multiple of tensor_parallel 2"):
        pretrain(tensor_parallel=2)
    site = tmp_path / "site.yaml"  # a layout from the profile, checked on the profile's ranks
    site.write_text("executor: local\nresources:\n  tasks_per_node: 3\nlayout:\n"
                    "  tensor_parallel: 2\n")
    with pytest.raises(SpecError, match=r"world size 3 is not a multiple of tensor_parallel 2 .*"
                                        r"\(with tensor_parallel 2 from the profile's layout, "
                                        r".*site\.yaml:5\)"):
        pretrain(str(site))
    assert not (home / "jobs").exists() and not (home / "artifacts").exists()


def test_reshard_flow_builds_then_finds_its_checkpoint(home, tmp_path):
    """A weights-only checkpoint (as convert writes one) resharded for FSDP: the stage's MLflow
    run holds the target layout as params and the sizes and times as metrics; run again, it is
    taken from the cache; a layout the model does not divide is refused before any job."""
    from engine.convert.native import write_native
    from engine.model.config import ModelConfig
    from engine.model.llama import LlamaModel

    cfg = ModelConfig.model_validate(TINY_TRAIN["options"]["model"])
    model = LlamaModel(cfg)
    model.init_weights(0)
    write_native(tmp_path / "source", model, cfg, {"stage": "convert"})
    options = {"data_parallel": "fsdp", "optimizer": False, "device": "cpu"}
    with pytest.raises(SpecError, match="num_heads 2 is not divisible by tensor_parallel 4"):
        asyncio.run(reshard(str(tmp_path / "source"), {**options, "tensor_parallel": 4}, INLINE))
    assert not (home / "jobs").exists()

    ref = asyncio.run(reshard(str(tmp_path / "source"), options, INLINE))["reshard"]
    assert not ref.cached and ref.kind == "checkpoint"
    assert ref.summary["format"] == "sharded" and ref.summary["parameters"] == sum(
        p.numel() for p in model.parameters())
    (run,) = stage_runs("reshard")
    assert run.data.params["data_parallel"] == "fsdp" and run.data.params["optimizer"] == "False"
    assert run.data.params["artifact.source.path"] == str(tmp_path / "source" / "iter_0000000")
    assert run.data.metrics["bytes"] == ref.summary["bytes"] > 0
    assert run.data.metrics["seconds.total"] > 0
    again = asyncio.run(reshard(str(tmp_path / "source"), options, INLINE))["reshard"]
    assert again.cached and again.path == ref.path


def test_failing_stage_fails_the_flow_with_the_jobs_error(home, tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "a fine story"}\nthis line is not JSON\n')
    with pytest.raises(JobFailed, match="bad.jsonl:2: malformed JSON") as failure:
        asyncio.run(data_prep({"corpus": str(corpus)}, {"profile": "local"}))
    assert "FAILED" in str(failure.value)
    runs = stage_runs("data_prep")
    assert [r.data.tags["lmforge.stage"] for r in runs] == ["train-tokenizer"]
    assert runs[0].info.status == "FAILED"
    assert "bad.jsonl:2" in runs[0].data.tags["lmforge.error"]
    parent = tracking.client().get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"
    assert not list((home / "artifacts").rglob("*.lease"))


def test_two_flows_building_one_artifact_build_it_once(home):
    refs = asyncio.run(same_stage_twice({"documents": 50}))
    assert sorted(ref.cached for ref in refs) == [False, True]
    assert refs[0].path == refs[1].path
    assert len(job_dirs(home)) == 1


def test_lease_takeover_and_release(tmp_path):
    path = tmp_path / "artifact.lease"
    mine, theirs = Lease(path), Lease(path)
    assert mine.try_acquire() and not theirs.try_acquire()
    theirs.release()  # not the holder: leaves it
    assert mine.held()
    mine.release()
    assert not path.exists()
    # a holder whose process is gone
    path.write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename, "token": "x"}))
    assert theirs.try_acquire() and theirs.held()
    # a holder on another host whose heartbeat stopped
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "y"}))
    assert not mine.try_acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert mine.try_acquire() and mine.held()


def test_transient_submission_failures_are_retried(home, monkeypatch):
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise OSError("sbatch: error: Batch job submission failed: Socket timed out")
        return real(*args, **kwargs)

    real = submission.submit
    monkeypatch.setattr(submission, "submit", flaky)
    monkeypatch.setattr(submission, "RETRY_DELAYS_S", (0.0,))
    ref = asyncio.run(one_stage("generate-corpus", {"documents": 10}, "inline"))
    assert len(calls) == 2 and not ref.cached
    # a request the profile refuses is no transient failure
    with pytest.raises(ProfileError, match="one rank"):
        asyncio.run(one_stage("generate-corpus", {"documents": 11}, "inline", {"tasks_per_node": 2}))
    assert len(calls) == 3


def test_lifecycle_end_to_end(home):
    kwargs = {"data": SMALL_DATA, "training": TINY_TRAIN, "evaluation": TINY_EVAL,
              "register_as": "tiny-test", "run": INLINE}
    refs = asyncio.run(lifecycle(**kwargs))
    assert list(refs) == ["generate-corpus", "train-tokenizer", "tokenize[0]", "tokenize[1]",
                          "merge", "pretrain", "convert", "generate-corpus (held-out)", "evaluate"]
    assert (refs["convert"].kind, refs["evaluate"].kind) == ("hf-model", "eval-report")
    ppl = refs["evaluate"].summary["metrics"]
    assert len(ppl) == 1 and 1 < next(iter(ppl.values())) < 400
    assert "/heldout-000.jsonl/" in next(iter(ppl)), ppl  # named apart from training's stories

    mlflow = tracking.client()
    names = sorted(r.info.run_name for r in stage_runs("lifecycle"))  # as Prefect names them
    assert names == sorted(["generate-corpus", "train-tokenizer", "tokenize stories-000.jsonl",
                            "tokenize stories-001.jsonl", "merge", "pretrain",
                            "convert native to HF", "held-out corpus", "evaluate"]), names
    runs = {r.data.tags["lmforge.stage"]: r for r in stage_runs("lifecycle")}
    train = runs["pretrain"]
    assert train.data.params["iters"] == "20" and train.data.params["model.hidden_size"] == "32"
    losses = mlflow.get_metric_history(train.info.run_id, "loss")
    assert sorted(m.step for m in losses) == [5, 10, 15, 20]  # each step once: live + backfill
    assert losses[-1].value < losses[0].value
    files = {f.path for f in mlflow.list_artifacts(train.info.run_id)}
    assert {"spec.json", "manifest.json", "plots", "metrics", "job"} <= files
    assert [f.path for f in mlflow.list_artifacts(train.info.run_id, "plots")] == ["plots/loss.png"]
    report = [f.path for f in mlflow.list_artifacts(runs["evaluate"].info.run_id, "artifact")]
    assert {"artifact/report.json", "artifact/report.md"} <= set(report)
    assert any(k.startswith("metrics.ppl/") for k in runs["evaluate"].data.metrics)
    convert = runs["convert"].data  # what describes the model is a parameter, what measures a metric
    assert "verification.max_abs_diff" in convert.metrics
    assert not [k for k in convert.metrics if k.startswith(("model.", "token_ids."))]
    assert convert.params["artifact.model.hidden_size"] == "32"

    versions = mlflow.search_model_versions("name = 'tiny-test'")
    assert [v.source for v in versions] == [f"file://{refs['convert'].path}"]
    assert refs["convert"].registered == "models:/tiny-test/1"
    # Prefect: the flow run tagged; its summary lists each artifact and links the MLflow parent
    # run and the model version; the parent links the flow run back
    (first,) = mlflow.search_runs([tracking.experiment_id("lifecycle")],
                                  "tags.`prefect.flow_run_id` != ''")
    tags, (summary,) = flow_run_summary(first.data.tags["prefect.flow_run_id"], "lifecycle-summary")
    assert {"lmforge", "lifecycle", "profile:inline"} <= tags
    assert summary.type == "markdown" and summary.description == "lifecycle: 9 built, 0 cached"
    assert f"({tracking.run_link(first.info.experiment_id, first.info.run_id)})" in summary.data
    assert f"[models:/tiny-test/1]({tracking.ui_url()}/#/models/tiny-test/versions/1)" in summary.data
    pretrain = tracking.run_link(first.info.experiment_id, refs["pretrain"].mlflow_run_id)
    assert f"| pretrain | pretrain | checkpoint | [built]({pretrain}) | `{refs['pretrain'].path}` |" \
        in summary.data
    assert f"| train/loss | {refs['pretrain'].summary['loss']:.6g} |" in summary.data
    assert first.data.tags["prefect.flow_run_url"].endswith(first.data.tags["prefect.flow_run_id"])
    # a local store: the version on its logged model's page, as a server puts it
    (exported,) = runs["convert"].outputs.model_outputs
    assert str(mlflow.get_model_version_by_alias("tiny-test", "latest-lifecycle").version) == "1"
    assert json.loads(mlflow.get_logged_model(exported.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "tiny-test", "version": 1}]
    assert versions[0].tags["lmforge.eval_run"] == runs["evaluate"].info.run_id
    assert mlflow.get_experiment_by_name("lifecycle").tags["mlflow.experimentKind"] == (
        "custom_model_development")
    with get_client(sync_client=True) as client:
        published = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lmforge-evaluate"])))
    assert published and published[0].type == "table" and "MLflow run" in published[0].description

    again = asyncio.run(lifecycle(**kwargs))
    assert all(ref.cached for ref in again.values())
    assert len(mlflow.search_model_versions("name = 'tiny-test'")) == 1
    # the two flow runs compare in MLflow's runs table: the same headline figures on each parent
    parents = mlflow.search_runs([tracking.experiment_id("lifecycle")],
                                 "tags.`prefect.flow_run_id` != ''")
    assert len(parents) == 2 and parents[0].data.metrics == parents[1].data.metrics
    second = next(p for p in parents if p.info.run_id != first.info.run_id)
    _, (summary,) = flow_run_summary(second.data.tags["prefect.flow_run_id"], "lifecycle-summary")
    assert summary.description == "lifecycle: 0 built, 9 cached" and "[built]" not in summary.data
    headline = parents[0].data.metrics
    assert headline["train/loss"] == pytest.approx(refs["pretrain"].summary["loss"])
    assert "export/max_abs_diff" in headline and "train/iterations" not in headline
    assert parents[0].data.params["train.iterations"] == "20"  # describes: a param
    assert [headline[f"eval/{k}"] for k in ppl] == pytest.approx(list(ppl.values()))

    # the HF export and the native checkpoint it came from, side by side: the same numbers
    tok = refs["train-tokenizer"].path
    table = asyncio.run(compare(models=[refs["convert"].path, refs["pretrain"].path], tokenizer=tok,
                                evaluation=TINY_EVAL, run=INLINE))
    header, _, *rows = table.strip().splitlines()
    assert header.count("|") == 4 and rows
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == cells[2] and cells[1] not in ("", "-")
    parent = mlflow.search_runs([tracking.experiment_id("compare")], "tags.`prefect.flow_run_id` != ''")
    names = {f.path for f in mlflow.list_artifacts(parent[0].info.run_id)}
    assert {"comparison.md", "comparison.png"} <= names
    flow_run_id = parent[0].data.tags["prefect.flow_run_id"]  # the link back to Prefect's UI
    assert parent[0].data.tags["prefect.flow_run_url"] == (
        f"{PREFECT_UI_URL.value()}/flow-runs/flow-run/{flow_run_id}")
    assert PREFECT_UI_URL.value().startswith("http://127.0.0.1:")
    with get_client(sync_client=True) as client:
        published = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["model-comparison"])))
    assert published and published[0].type == "markdown"
    tags, (summary,) = flow_run_summary(flow_run_id, "compare-summary")
    assert {"lmforge", "compare", "profile:inline"} <= tags
    assert table.strip() in summary.data and "| evaluate: " in summary.data


def test_compress_flow_prunes_recovers_and_compares(home, tmp_path):
    """stories260K (HF) → native → pruned (width and depth) → recovered by distillation from the
    parent → HF → registered; parent, pruned and recovered evaluated alike and compared in one
    table (Prefect artifact, MLflow parent run). A target the model cannot take is refused first."""
    from conftest import shared
    from engine.data import tokenize

    parent = shared("tiny-llama", "hf")
    stories = shared("text", "tinystories", "tinystories_sample.txt").read_text()
    corpus = tmp_path / "stories.jsonl"
    corpus.write_text("".join(json.dumps({"text": s.strip()}) + "\n"
                              for s in stories.split("<|endoftext|>") if s.strip()))
    tokenize.run(tokenize.Spec(input=[str(corpus)], output_prefix=str(tmp_path / "stories"),
                               tokenizer=str(parent / "tokenizer.model"), add_bos=True,
                               progress=False))
    dataset = str(tmp_path / "stories_text_document")
    recovery = {"options": {**TINY_TRAIN["options"], "iters": 4}}
    pruning = {"hidden_size": 48, "num_layers": 4, "calibration_samples": 8, "seq_length": 32,
               "progress": False}
    form = parameter_schema(compress).definitions
    assert form["PruneOptions"]["properties"]["method"]["enum"] == ["activation", "magnitude",
                                                                  "random"]
    assert form["DistillOptions"]["properties"]["alpha"]["maximum"] == 1
    with pytest.raises(SpecError, match="hidden_size 50 is not a multiple of multiple_of 16"):
        asyncio.run(compress(str(parent), dataset, pruning={"hidden_size": 50, "multiple_of": 16},
                             recovery=recovery, evaluation=TINY_EVAL, run=INLINE))
    assert not (home / "jobs").exists() and not (home / "artifacts").exists()

    refs = asyncio.run(compress(str(parent), dataset, pruning=pruning, recovery=recovery,
                                evaluation=TINY_EVAL, register_as="stories-small", run=INLINE))
    assert {"convert (import)", "prune", "distill", "convert", "evaluate", "evaluate: parent",
            "evaluate: pruned"} <= set(refs)
    spec = json.loads((home / "artifacts" / "distill").glob("*/manifest.json").__next__()
                      .read_text())["spec"]
    assert spec["distill"]["teacher"] == refs["convert (import)"].path
    assert spec["load"] == refs["prune"].path and spec["distill"]["alpha"] == 0.0
    assert refs["prune"].summary["parameters"]["after"] < 260_032
    assert refs["convert"].registered == "models:/stories-small/1"

    mlflow = tracking.client()
    (run,) = mlflow.search_runs([tracking.experiment_id("compress")],
                                "tags.`prefect.flow_run_id` != ''")
    after = refs["prune"].summary["parameters"]["after"]
    assert run.data.metrics["parent/parameters"] == 260_032
    assert run.data.metrics["pruned/parameters"] == run.data.metrics["recovered/parameters"] == after
    ppl = {label: run.data.metrics[f"{label}/ppl/heldout-000.jsonl/512:512/ppl"]
           for label in ("parent", "pruned", "recovered")}
    assert ppl["recovered"] < ppl["pruned"], ppl  # four steps of distillation already help
    with get_client(sync_client=True) as client:
        (published,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["compression"])))
    header, _, params, *rows = published.data.strip().splitlines()
    assert header.split("|")[2:5] == [" parent ", " pruned ", " recovered "]
    assert params.startswith("| parameters | 260,032 |") and rows[-1].startswith("| ppl scoring")
    (prune_run,) = [r for r in stage_runs("compress") if r.data.tags["lmforge.stage"] == "prune"]
    assert prune_run.data.params["method"] == "activation"


def test_extend_flow_trains_at_the_new_length_and_compares(home, tmp_path):
    """stories260K (HF, 512 positions) extended to 1,024 by PI and trained 3 steps on a book;
    base and extended evaluated alike over 512- and 1,024-token windows and by passkey, in one
    comparison. A factor that does not give the length is refused before any job."""
    from conftest import shared
    from engine.data import tokenize

    parent = shared("tiny-llama", "hf")
    book = shared("text", "gutenberg", "pg11.txt").read_text(encoding="utf-8").split("\n\n")
    corpus, heldout = tmp_path / "alice.jsonl", tmp_path / "heldout.jsonl"
    corpus.write_text("".join(json.dumps({"text": "\n\n".join(book[i:i + 40])}) + "\n"
                              for i in range(0, len(book), 40)))
    heldout.write_text(json.dumps({"text": "\n\n".join(book[-120:])}) + "\n")
    tokenize.run(tokenize.Spec(input=[str(corpus)], output_prefix=str(tmp_path / "alice"),
                               tokenizer=str(parent / "tokenizer.model"), add_bos=True,
                               progress=False))
    training = {"data": {"seq_length": 1024, "split": "95,5,0"}, "iters": 3,
                "micro_batch_size": 2, "global_batch_size": 2, "precision": "fp32",
                "optim": {"lr": 2e-3, "warmup_iters": 1}}
    evaluation = {"options": {"ppl": [str(heldout)], "windows": ["512", "1024"],
                              "passkey": [256, 1024], "passkey_depths": [0.5],
                              "passkey_trials": 1, "progress": False}}
    args = {"dataset": str(tmp_path / "alice_text_document"), "training": training,
            "evaluation": evaluation, "run": INLINE}
    with pytest.raises(SpecError, match="context.factor 3 × the checkpoint's length 512"):
        asyncio.run(extend(str(parent), {"max_length": 1024, "factor": 3}, **args))
    with pytest.raises(ValueError, match="training needs dataset"):  # the Cookbook's by default
        asyncio.run(extend(str(parent), {"max_length": 1024}, run=INLINE))
    with pytest.raises(SpecError, match=r"data.seq_length \(8192\) is above context.max_length "
                                        r"\(1024\)"):
        asyncio.run(extend(str(parent), {"max_length": 1024}, dataset=args["dataset"],
                           run=INLINE))
    assert not (home / "jobs").exists() and not (home / "artifacts").exists()

    refs = asyncio.run(extend(str(parent), {"max_length": 1024}, **args))
    assert {"extend", "finetune", "convert", "evaluate", "evaluate: base"} <= set(refs)
    assert json.loads((Path(refs["convert"].path) / "config.json").read_text())[
        "rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    (run,) = tracking.client().search_runs([tracking.experiment_id("extend")],
                                           "tags.`prefect.flow_run_id` != ''")
    metrics = run.data.metrics
    long = "ppl/heldout.jsonl/1024:1024/ppl"
    assert metrics[f"extended/{long}"] < metrics[f"base/{long}"]
    assert {"base/passkey/1024/accuracy", "extended/passkey/1024/accuracy"} <= set(metrics)
    with get_client(sync_client=True) as client:
        (published,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["extension"])))
        (chart,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["extension-by-length"])))
    assert published.data.splitlines()[0].split("|")[2:4] == [" base ", " extended "]
    by_length = published.data.split("By context length:")[1].strip().splitlines()
    assert by_length[0].startswith("| length | base: ppl heldout.jsonl | extended: ppl heldout")
    rows = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:6]]
            for row in by_length[2:]}
    assert list(rows) == ["256", "512", "1,024"]  # 256: passkey only
    assert rows["256"][:2] == ["–", "–"] and "–" not in rows["256"][2:]
    assert float(rows["1,024"][1]) < float(rows["1,024"][0])  # the extension helps at 1,024
    assert chart.type == "image" and chart.data == tracking.artifact_url(run.info.run_id,
                                                                         "by_context_length.png")
    assert "by_context_length.png" in {f.path for f in tracking.client().list_artifacts(
        run.info.run_id)}
