"""What a person sees at the end of `python -m flows.lifecycle`: each artifact (built or cached),
the headline figures, the registered model, and how to open the Prefect and MLflow UIs on these
results."""

from __future__ import annotations

import os
import shlex

from prefect.settings import PREFECT_UI_URL

from flows.steps import Refs
from engine.redact import redact_text
from tasks.artifact import trained_ref
from tasks.home import lmforge_home
from tasks.tracking import client, tracking_uri


def print_report(refs: Refs, compressed: Refs | None = None, night: Refs | None = None) -> None:
    """The lifecycle's artifacts and figures, and those of its model's compression and of a
    nightly distillation."""
    every = {**refs, **{f"compress: {k}": v for k, v in (compressed or {}).items()},
             **{f"nightly: {k}": v for k, v in (night or {}).items()}}
    width = max(len(step) for step in every) if every else 0
    print("\nartifacts:")
    for step, ref in every.items():
        print(f"  {step:<{width}}  {'cached' if ref.cached else 'built ':<6}  {ref.path}")
    trained = trained_ref(refs)
    if trained:
        print(f"\ntraining: {trained.summary.get('iterations')} steps, final loss "
              f"{trained.summary.get('loss')}, validation loss {trained.summary.get('valid_loss')}")
    if "evaluate" in refs:
        for name, value in refs["evaluate"].summary.get("metrics", {}).items():
            print(f"evaluation: {name} = {value:.4f}")
    if "convert" in refs and refs["convert"].registered:
        print(f"registered: {refs['convert'].registered}")
    if compressed:
        _print_compression(compressed)
    if night is not None:
        _print_night(night)
    prefect_home = os.environ.get("PREFECT_HOME", "~/.prefect")
    uri = redact_text(tracking_uri())  # printed: a server's password stays out of the terminal
    if PREFECT_UI_URL.value():  # a server (tasks/prefect_api.py): it is there already
        print(f"\nPrefect UI (flow runs, task logs, artifacts): {PREFECT_UI_URL.value()}")
    else:
        print("\nPrefect UI (flow runs, task logs, artifacts): run\n"
              f"  PREFECT_HOME={shlex.quote(prefect_home)} .venv/bin/prefect server start\n"
              "and open http://127.0.0.1:4200")
    if uri.startswith(("http://", "https://")):
        print(f"MLflow UI: {uri}")
    else:
        print("MLflow UI (experiments, metrics, loss curves, registered models): run\n"
              f"  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui --backend-store-uri "
              f"{shlex.quote(uri)} --workers 1\n"
              "and open http://127.0.0.1:5000")
    print(f"Artifacts live under {lmforge_home() / 'artifacts'}; run the same command again "
          "and every stage comes from the cache.")


def _print_compression(refs: Refs) -> None:
    sizes = refs["prune"].summary["parameters"]
    print(f"\ncompressed: {sizes['before']:,} -> {sizes['after']:,} parameters; registered "
          f"{refs['convert'].registered}")
    for label, step in (("parent", "evaluate: parent"), ("pruned", "evaluate: pruned"),
                        ("recovered", "evaluate")):
        for name, value in refs[step].summary.get("metrics", {}).items():
            print(f"  {label:<9} {name} = {value:.4f}")


def _print_night(night: Refs) -> None:
    if not night:
        print("\nnightly distillation: no new data in the drop folder (the shard was consumed "
              "by an earlier demo run)")
        return
    registered = night["convert"].registered
    name, version = registered.removeprefix("models:/").rsplit("/", 1)
    tags = client().get_model_version(name, version).tags
    outcome = (f"promoted to @champion: {tags['lmforge.promoted']}" if "lmforge.promoted" in tags
               else f"rejected: {tags.get('rejected')}")
    print(f"\nnightly distillation: {registered} {outcome}")
