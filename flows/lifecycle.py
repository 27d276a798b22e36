"""The lifecycle flow: every stage of a model's life, chained. Today: a corpus (generated, or
given), a tokenizer (trained, or given), tokenize per shard, merge the shards, and the training
sample split; training, conversion and evaluation plug in as their stages land."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger

from tasks.stage import run_stage


@flow(name="lifecycle")
def lifecycle(home: str | None = None, corpus: str | None = None, tokenizer: str | None = None,
              documents: int = 4000, vocab_size: int = 512, workers: int = 2) -> dict:
    """Run the stages into `<home>/runs/<timestamp>/`; returns the manifests by stage."""
    log = get_run_logger()
    run_dir = Path(home or os.environ.get("LMFORGE_HOME", "lmforge-home")).resolve() / "runs" / \
        time.strftime("%Y%m%d-%H%M%S")
    out: dict[str, dict] = {}
    if corpus is None:
        corpus = str(run_dir / "corpus")
        out["generate-corpus"] = run_stage("generate-corpus", {"output": corpus, "documents": documents})
    if tokenizer is None:
        tok_dir = run_dir / "tokenizer"
        out["train-tokenizer"] = run_stage("train-tokenizer", {"input": [corpus], "output": str(tok_dir),
                                                               "vocab_size": vocab_size})
        tokenizer = str(tok_dir / "tokenizer.model")
    shards = sorted(str(p) for p in Path(corpus).glob("*.jsonl"))
    parts = []
    for i, shard in enumerate(shards):
        prefix = run_dir / "data" / f"part-{i:03d}"
        out[f"tokenize[{i}]"] = run_stage("tokenize", {"input": [shard], "output_prefix": str(prefix),
                                                       "tokenizer": tokenizer, "append_eod": True,
                                                       "workers": workers, "progress": False})
        parts.append(f"{prefix}_text_document")
    out["merge"] = run_stage("merge", {"input": parts, "output_prefix": str(run_dir / "data" / "all")})
    log.info("dataset: %s documents, %s tokens -> %s", out["merge"]["summary"]["documents"],
             out["merge"]["summary"]["tokens"], run_dir / "data" / "all")
    return out


if __name__ == "__main__":
    lifecycle()
