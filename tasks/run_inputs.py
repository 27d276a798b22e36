"""What a stage run read, in MLflow's terms: the data as dataset inputs, the models it started
from as logged-model inputs. A dataset's source is its path (nothing is uploaded), its digest our
lineage fingerprint (engine/lineage.py: an artifact's manifest fingerprint, else the content's
sha256), its context what the stage used it for; so two runs trained on the same bytes show the
same digest wherever the files lay.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from engine.lineage import artifact_manifest
from tasks.headline import is_number
from tasks.home import lmforge_home
from tasks.logged_models import find

MODELS = ("model", "source", "load")  # input names (engine's input_paths) that are models
CONTEXTS = {"pretrain": "training", "finetune": "training", "distill": "training",
            "evaluate": "evaluation"}
DIGEST_MAX = 36                       # MLflow's limit; the full fingerprint is an input tag

Inputs = dict[str, tuple[str, str]]   # input name -> (path, fingerprint)


def log_inputs(mlflow: MlflowClient, run_id: str, stage: str, inputs: Inputs) -> None:
    datasets = [_dataset(stage, name, path, fp) for name, (path, fp) in inputs.items()
                if name not in MODELS]
    models = [LoggedModelInput(model.model_id) for name, (_, fp) in inputs.items()
              if name in MODELS and (model := find(mlflow, fp)) is not None]
    if not (datasets or models):
        return
    try:
        mlflow.log_inputs(run_id, datasets=datasets, models=models)
    except MlflowException:
        # MLflow creates an experiment's dataset on first use without a lock: two stages logging
        # one (tokenize jobs sharing a tokenizer) may collide, and one is refused; now it exists
        mlflow.log_inputs(run_id, datasets=datasets, models=models)


def dataset_name(path: str) -> str:
    """The path under LMFORGE_HOME's artifacts (`merge/5f3a…/data`: says which stage made it),
    else the file's name."""
    try:
        return str(Path(path).resolve().relative_to((lmforge_home() / "artifacts").resolve()))
    except ValueError:
        return Path(path).name


def _dataset(stage: str, name: str, path: str, fingerprint: str) -> DatasetInput:
    manifest = artifact_manifest(path)
    profile = ({k: v for k, v in manifest.summary.items() if is_number(v)} if manifest else {})
    dataset = Dataset(name=dataset_name(path), digest=fingerprint[:DIGEST_MAX], source_type="local",
                      source=json.dumps({"uri": str(path)}), profile=json.dumps(profile))
    context = "tokenizer" if name == "tokenizer" else CONTEXTS.get(stage, stage)
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context),
                                       InputTag("lmforge.input", name),
                                       InputTag("lmforge.fingerprint", fingerprint)])
