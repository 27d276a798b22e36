"""The synthesize flow under Prefect's test harness: a teacher from the MLflow registry
(models:/NAME/latest), the corpus built once and then taken from the cache, and the stage's MLflow
run with its parameters, counts, throughput and table of sample completions."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from conftest import shared
from prefect.testing.utilities import prefect_test_harness

from flows.synthesize import synthesize
from tasks import tracking


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_synthesize_flow_from_a_registered_teacher(tmp_path, monkeypatch, prefect_api):
    home = tmp_path / "home"
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LMFORGE_CLUSTER_PROFILE", raising=False)
    teacher = shutil.copytree(shared("tiny-llama", "hf"), tmp_path / "teacher")
    mlflow = tracking.client()
    mlflow.create_registered_model("stories-teacher")
    mlflow.create_model_version("stories-teacher", teacher.as_uri(),
                                tags={"lmforge.path": str(teacher)})
    corpus = tmp_path / "corpus.jsonl"
    stories = shared("text", "tinystories", "tinystories_sample.txt").read_text()
    corpus.write_text("".join(json.dumps({"text": s.strip()}) + "\n"
                              for s in stories.split("<|endoftext|>") if s.strip()))
    options = {"prefix_tokens": 16, "sampling": {"max_tokens": 16}, "progress": False,
               "samples": 3}
    run = {"profile": "inline"}

    refs = asyncio.run(synthesize([str(corpus)], "models:/stories-teacher/latest",
                                  options=options, run=run))
    ref = refs["synthesize"]
    assert not ref.cached and ref.kind == "corpus"
    s = ref.summary
    assert s["prompts"] == s["documents"] > 0 and s["kept"] + sum(s["filtered"].values()) == \
        s["completions"]
    experiment = mlflow.get_experiment_by_name("synthesize").experiment_id
    stage = next(r for r in mlflow.search_runs([experiment], "tags.`lmforge.stage` = 'synthesize'"))
    assert stage.data.params["sampling.temperature"] == "0.7"
    assert stage.data.params["teacher"] == str(teacher)
    metrics = stage.data.metrics
    assert metrics["kept"] == s["kept"] and metrics["prompts"] == s["prompts"]
    assert metrics["throughput.tokens_per_second"] > 0
    assert json.loads(stage.data.tags["mlflow.loggedArtifacts"]) == [
        {"path": "samples.json", "type": "table"}]
    table = json.loads(Path(mlflow.download_artifacts(stage.info.run_id, "samples.json",
                                                      str(tmp_path))).read_text())
    assert len(table["data"]) == min(3, s["kept"])
    assert set(table["columns"]) >= {"document", "prefix", "completion", "finish_reason"}

    again = asyncio.run(synthesize([str(corpus)], "models:/stories-teacher/1", options=options,
                                   run=run))
    assert again["synthesize"].cached and again["synthesize"].path == ref.path
