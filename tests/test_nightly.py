"""The nightly distillation flow on CPU with real models: stories260K (HF) is the first night's
student and the teacher; chunks of Alice in Wonderland arrive in a drop folder; other chunks of
it are the held-out text. Night 1 promotes its candidate (the book's perplexity falls), night 2
finds no new shards and does nothing, night 3 with new shards is held to a margin it cannot
reach and is rejected, the champion staying. Bad inputs are refused before any job."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from conftest import shared
from engine.errors import InputError
from engine.manifest import read_manifest
from flows.nightly_distill import nightly_distill
from tasks import tracking
from tasks.champion import history
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
                              "progress": False}}
    args = {"drop": str(drop), "teacher": str(parent), "register_as": NAME,
            "bootstrap": str(parent), "synthesis": SYNTHESIS, "training": TRAINING,
            "evaluation": evaluation, "run": {"profile": "inline"}}
    return drop, chunks, args


@pytest.mark.slow
def test_three_nights_promote_wait_and_reject(nights):
    drop, chunks, args = nights
    mlflow = tracking.client()

    first = asyncio.run(nightly_distill(**args))
    assert {"synthesize", "finetune", "convert", "evaluate", "evaluate: champion"} <= set(first)
    champion = mlflow.get_model_version_by_alias(NAME, "champion")
    assert first["convert"].registered == f"models:/{NAME}/{champion.version}"
    assert champion.tags["lmforge.teacher"] == args["teacher"]
    assert champion.tags["lmforge.shards"] == "day-1.jsonl"
    assert champion.tags["lmforge.base_model"] == args["bootstrap"]
    assert "% required" in champion.tags["lmforge.promoted"]
    (night,) = history(NAME)
    assert night["promote"] and night["candidate"] < night["champion"]
    blend = read_manifest(first["finetune"].path).spec["data"]["blend"]
    assert blend[0] == "0.5" and blend[2] == "0.5"  # the new shards and their continuations
    assert list(consumed(NAME)) == [str(drop / "day-1.jsonl")]

    assert asyncio.run(nightly_distill(**args)) == {}  # no new shards: nothing runs
    assert len(history(NAME)) == 1

    _write(drop / "day-3.jsonl", chunks[16:24])
    third = asyncio.run(nightly_distill(**{**args, "promotion": {"min_improvement": 0.5}}))
    version = third["convert"].registered.rsplit("/", 1)[1]
    rejected = mlflow.get_model_version(NAME, version)
    assert "rejected" in rejected.tags and "< the 50.00% required" in rejected.tags["rejected"]
    assert rejected.tags["lmforge.base_model"] == f"models:/{NAME}/{champion.version}"
    assert mlflow.get_model_version_by_alias(NAME, "champion").version == champion.version
    assert [n["promote"] for n in history(NAME)] == [True, False]
    assert sorted(consumed(NAME)) == [str(drop / "day-1.jsonl"), str(drop / "day-3.jsonl")]
    parents = mlflow.search_runs([tracking.experiment_id("nightly-distill")],
                                 "tags.`prefect.flow_run_id` != ''")
    assert len(parents) == 2  # nights 1 and 3: a night without data opens no run
    for run in parents:
        assert {"comparison.md", "champion_history.png"} <= {
            f.path for f in mlflow.list_artifacts(run.info.run_id)}


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
