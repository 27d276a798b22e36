"""The synthesize flow: a teacher (an HF folder, a native checkpoint, or a registered model)
continues the first tokens of each document of a corpus; the result is a corpus of completions,
filtered, that the data_prep flow (or the tokenize stage) turns into a dataset."""

from __future__ import annotations

from prefect import flow

from flows.params import RunParams, SynthesizeOptions
from flows.runner import Runner
from flows.steps import Refs, given_model, synthesize_corpus
from tasks.models import pin
from tasks.run_tags import tag_flow_run
from tasks.summary import publish_summary
from tasks.tracking import tracked_flow


@flow(name="synthesize")
async def synthesize(corpus: list[str], teacher: str, tokenizer: str | None = None,
                     options: SynthesizeOptions = SynthesizeOptions(),
                     run: RunParams = RunParams()) -> Refs:
    """Returns a reference to the synthesized corpus (`synthesize`).

    Args:
        corpus: JSONL files, folders of shards or globs.
        teacher: an HF folder, a native checkpoint, or models:/NAME/VERSION|latest|@ALIAS.
        tokenizer: default: the teacher's own.
        options: prefix length, sampling, backend, shards, filters.
        run: cluster profile, per-stage resources (ranks: data parallel), forced rebuilds.
    """
    await tag_flow_run(run.profile)
    teacher = pin(teacher)  # `latest` now: the run records, and uses, that version
    model = given_model(teacher)
    await synthesize_corpus(Runner(run, dry=True), options, corpus, model, tokenizer, {})
    refs: Refs = {}
    with tracked_flow({"corpus": corpus, "teacher": teacher, "tokenizer": tokenizer,
                       "options": options, "run": run}, refs):
        await synthesize_corpus(Runner(run), options, corpus, model, tokenizer, refs)
        await publish_summary(refs)
        return refs
