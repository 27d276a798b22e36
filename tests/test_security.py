"""Security rules: secrets redacted wherever lmforge shows a spec, an environment or a URI
(MLflow params, tags and artifacts, the engine's JSON lines, job logs, Prefect tables); what a
stage writes and what gets registered stays inside LMFORGE_HOME; missing test material fails CI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.engine_process import EngineProcess
from engine.errors import SpecError
from engine.manifest import Manifest
from engine.metrics import MetricsSink
from engine.redact import redact, redact_text
from tasks import tracking
from tasks.artifact import ArtifactRef
from tasks.models import _register
from tasks.options import validate_spec
from tasks.publish import key_figures

PASSWORD = "hunter2"
SOURCE = f"https://lm:{PASSWORD}@data.example/corpus.jsonl"
SPEC = {"documents": 10, "source": SOURCE, "tokenizer": "/data/auth/tokenizer.model",
        "env": {"HF_TOKEN": "hf_abc123", "NCCL_DEBUG": "WARN", "WANDB_API_KEY": "w-456"}}
SECRETS = (PASSWORD, "hf_abc123", "w-456", "k-789")


@pytest.mark.parametrize("key", ["HF_TOKEN", "hfToken", "api_key", "API-KEY", "apikey",
                                 "AWS_SECRET_ACCESS_KEY", "db_password", "PGPASSWORD", "passwd",
                                 "credentials", "private_key", "Authorization", "run.env.HF_TOKEN"])
def test_secret_keys_are_masked(key):
    assert redact({key: "s3cr3t"}) == {key: "***"}


@pytest.mark.parametrize("key", ["tokenizer", "tokens_per_s", "batch_tokens", "author", "json_keys",
                                 "text_key", "passes", "authority"])
def test_other_keys_are_not(key):
    assert redact({key: "value"}) == {key: "value"}


def test_url_passwords_are_masked_in_any_string_and_nothing_else():
    assert (redact_text("postgresql://lm:p@ss:w0rd@db:5432/mlflow") ==
            "postgresql://lm:***@db:5432/mlflow")
    assert (redact_text(f"cannot read {SOURCE} nor http://u:v@h/x") ==
            "cannot read https://lm:***@data.example/corpus.jsonl nor http://u:***@h/x")
    for plain in ("http://127.0.0.1:5000/api", "https://user@host/x", "/data/auth/token.txt",
                  "lm:hunter2 without a scheme"):
        assert redact_text(plain) == plain
    shown = redact({"blend": ["0.5", SOURCE], "env": {"EMPTY_TOKEN": "", "HF_TOKEN": None}})
    assert shown == {"blend": ["0.5", "https://lm:***@data.example/corpus.jsonl"],
                     "env": {"EMPTY_TOKEN": "", "HF_TOKEN": None}}  # unset stays visibly unset


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """LMFORGE_HOME with its default MLflow store (SQLite) in a temporary folder."""
    root = tmp_path_factory.mktemp("security")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_HOME", str(root / "home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv(tracking.UI_ENV, f"http://ui:{PASSWORD}@mlflow.example:5000")
        yield root / "home"


def test_a_stage_run_reads_back_from_mlflow_redacted(home, tmp_path, monkeypatch, caplog):
    location = home / "artifacts" / "generate-corpus" / ("f" * 16)
    run = tracking.StageRun.start("generate-corpus", "f" * 64, {}, str(location), SPEC,
                                  cached=False)
    # the job's own sink logs the same spec into the same run: the two must agree, or MLflow
    # refuses the second value of a param
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri())
    monkeypatch.setenv("MLFLOW_RUN_ID", run.run_id)
    with caplog.at_level(logging.WARNING, logger="engine.metrics"):
        MetricsSink(tmp_path / "metrics.jsonl").log_params(SPEC)
    assert "MLflow logging failed" not in caplog.text
    run.tag(error=RuntimeError(f"could not read {SOURCE}"))
    manifest = Manifest(kind="corpus", stage="generate-corpus", spec=SPEC, fingerprint="f" * 64,
                        summary={"documents": 10, "api_key": "k-789"})
    run.finished("generate-corpus", SPEC, manifest, str(location), None, None)

    mlflow = tracking.client()
    data = mlflow.get_run(run.run_id).data
    assert data.params["env.HF_TOKEN"] == data.params["env.WANDB_API_KEY"] == "***"
    assert data.params["env.NCCL_DEBUG"] == "WARN"
    assert data.params["source"] == "https://lm:***@data.example/corpus.jsonl"
    assert data.params["tokenizer"] == "/data/auth/tokenizer.model"
    assert data.tags["lmforge.error"] == "could not read https://lm:***@data.example/corpus.jsonl"
    spec, shown = (json.loads(Path(mlflow.download_artifacts(run.run_id, name, str(tmp_path)))
                              .read_text()) for name in ("spec.json", "manifest.json"))
    assert spec == redact(SPEC) == shown["spec"] and shown["summary"]["api_key"] == "***"
    jsonl = (tmp_path / "metrics.jsonl").read_text()
    everything = json.dumps([data.params, data.tags, spec, shown]) + jsonl + run.link
    assert not [s for s in SECRETS if s in everything]
    assert run.link.startswith("http://ui:***@mlflow.example:5000/#/experiments/")
    assert {"figure": "api_key", "value": "***"} in key_figures(manifest.summary)  # Prefect table


def test_job_logs_mask_url_passwords(tmp_path):
    """A real engine process failing on an input URL with a password: its rank log (streamed
    into the flow's log, attached to MLflow) shows the URL without it."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"input": [SOURCE], "output": str(tmp_path / "tok")}))
    log = tmp_path / "rank_00000.log"
    command = [sys.executable, "-m", "engine", "train-tokenizer", "--config", str(spec)]
    engine = EngineProcess(command, dict(os.environ), log, f"[cluster] {SOURCE}")
    assert engine.wait(timeout_s=120) == 2
    text = log.read_text()
    assert "input.0: no such file or folder: https://lm:***@data.example/corpus.jsonl" in text
    assert PASSWORD not in text


def _outside(home: Path, given: str, resolved: Path | None = None) -> str:
    shown = f"{given} (resolves to {resolved})" if resolved else given
    return (f"<generate-corpus spec>: output: {shown} is outside LMFORGE_HOME ({home}); lmforge "
            f"writes only inside it: choose a location under it, or set LMFORGE_HOME to a folder "
            f"that holds this one")


def test_outputs_outside_lmforge_home_are_refused(home, tmp_path, monkeypatch):
    home = home.resolve()
    (home / "artifacts").mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "elsewhere"
    (home / "link").symlink_to(tmp_path, target_is_directory=True)
    escapes = [(str(outside), None),
               (f"{home}/artifacts/../../elsewhere", home.parent / "elsewhere"),
               (f"{home}/link/elsewhere", outside)]
    for given, resolved in escapes:
        with pytest.raises(SpecError) as refused:
            validate_spec("generate-corpus", {"documents": 10, "output": given})
        assert str(refused.value) == _outside(home, given, resolved)
    with pytest.raises(SpecError, match=r"output: .* is LMFORGE_HOME itself"):
        validate_spec("generate-corpus", {"documents": 10, "output": f"{home}/artifacts/.."})
    # what a training stage writes besides its output, too
    train = {"model": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                       "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                       "max_position_embeddings": 128},
             "data": {"blend": [str(tmp_path / "shared-data")], "seq_length": 32}, "iters": 1,
             "global_batch_size": 1, "metrics_file": str(outside / "metrics.jsonl")}
    with pytest.raises(SpecError, match=r"^<pretrain spec>: metrics_file: .* is outside"):
        validate_spec("pretrain", train, location=str(home / "run"))

    # inside is fine, relative to the working directory too; inputs may lie anywhere
    monkeypatch.chdir(home)
    assert validate_spec("generate-corpus", {"documents": 10, "output": "artifacts/mine"})
    assert validate_spec("pretrain", {**train, "metrics_file": None})


def test_registry_and_artifact_locations_stay_inside_lmforge_home(home, tmp_path):
    ref = ArtifactRef(stage="convert", kind="hf-model", path=str(tmp_path / "model"),
                      fingerprint="e" * 64, cached=False, summary={}, files=[])
    with pytest.raises(SpecError, match=r"^registered model 'escapee': source: .* is outside "
                                        r"LMFORGE_HOME"):
        _register(ref, "escapee")
    assert not tracking.client().search_registered_models("name = 'escapee'")
    with pytest.raises(SpecError, match=r"^MLflow artifact location of experiment '\.\./\.\./x': "
                                        r".* \(resolves to .*\) is outside LMFORGE_HOME"):
        tracking.experiment_id("../../x")
    assert tracking.client().get_experiment_by_name("../../x") is None


MISSING = """
import pytest
from conftest import SHARED_DATA, shared

def test_through_shared():
    shared("no-such-material")

def test_own_check():
    pytest.skip(f"stories not found under {SHARED_DATA / 'no-such-material'}")

def test_other_skip():
    pytest.skip("not on this platform")
"""


@pytest.mark.parametrize("ci, outcome", [("", "3 skipped"), ("true", "2 failed, 1 skipped")])
def test_missing_shared_data_fails_under_ci(tmp_path, ci, outcome):
    """Through tests/conftest.py as a plugin, in a pytest of its own; a skip for another reason
    stays a skip."""
    (tmp_path / "test_missing.py").write_text(MISSING)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p",
                           "no:cacheprovider", "test_missing.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1].startswith(outcome), done.stdout
    if ci:
        assert "test material missing, and CI is set: Skipped: test material" in done.stdout
