"""The nightly distillation flow (docs/orchestration.md, "Nightly distillation"):

    corpus shards new in the drop folder since the last finished night (none: "no new data")
    -> the teacher continues them (synthesize) -> the new shards and the continuations tokenized
    with the student's tokenizer -> the champion finetuned on their blend, with logit KD from the
    teacher -> HF export, registered with its lineage -> champion and candidate evaluated alike
    -> the candidate becomes the champion only if it wins by the set margin, else it stays
    registered, tagged `rejected` with the reason

One night at a time per registered model (a lease); the watermark moves only when a night has
finished, so a failed night is re-run from the cache. Promotions are announced as Prefect
events; a failed night as a failed flow run with the tag `nightly` (automations act on both).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prefect import flow
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from engine.data.provenance import checkpoint_tokenizers
from engine.errors import InputError
from engine.formats import TOKENIZER_DIR
from flows.params import (EvalParams, NightlyTraining, PromotionParams, RunParams,
                          SynthesizeOptions, TokenizeOptions)
from flows.runner import Runner
from flows.steps import (Model, Refs, evaluate_side_by_side, export_model, finetune_or_distill,
                         given_model, native_checkpoint, synthesize_corpus, tokenize_files)
from tasks.champion import Verdict, current_champion, judge, publish_history, settle
from tasks.fields import merged
from tasks.lease import Lease
from tasks.models import pin
from tasks.run_tags import tag_flow_run
from tasks.summary import publish_summary
from tasks.tracking import tracked_flow
from tasks.watermark import commit, new_shards, nightly_dir, shard_id

LEASE_WAIT_S = 6 * 3600.0


@flow(name="nightly-distill")
async def nightly_distill(drop: str, teacher: str, register_as: str = "lmforge-tiny",
                          bootstrap: str | None = None, tokenizer: str | None = None,
                          synthesis: SynthesizeOptions | None = SynthesizeOptions(),
                          tokenize: TokenizeOptions = TokenizeOptions(append_eod=True,
                                                                      progress=False),
                          training: NightlyTraining = NightlyTraining(),
                          evaluation: EvalParams = EvalParams(),
                          promotion: PromotionParams = PromotionParams(),
                          run: RunParams = RunParams()) -> Refs:
    """Returns a reference to every artifact it made or found (none on a night without new data).

    Args:
        drop: the folder (or glob) where corpus shards (JSONL) arrive.
        teacher: an HF folder, a native checkpoint, or models:/NAME/VERSION|latest|@ALIAS.
        register_as: the registered model whose `champion` the night distils and may replace.
        bootstrap: the student of the first night, while `register_as` has no champion.
        tokenizer: the student's, when it has none beside it.
        synthesis: how the teacher continues the new shards; None: no synthetic data.
        tokenize: applied to the new shards and to the continuations.
        training: the finetune, the synthetic share of its blend, the KD, the export.
        evaluation: the suites both models are measured on.
        promotion: the metric and the margin that decide.
        run: cluster profile, per-stage resources, forced rebuilds.
    """
    await tag_flow_run(run.profile)
    log = get_run_logger()
    lease = Lease(nightly_dir(register_as) / "night.lease",
                  owner={"flow_run": str(flow_run.get_id())})
    await lease.acquire(LEASE_WAIT_S)  # a night already running finishes first
    beating = asyncio.create_task(lease.heartbeat())
    try:
        shards = new_shards(drop, register_as)
        if not shards:
            log.info("no new data: every shard in %s was consumed by an earlier night", drop)
            return {}
        student = _student(register_as, bootstrap)
        teacher = pin(teacher)
        log.info("%d new shard(s); student %s, teacher %s", len(shards), student, teacher)
        args = ([str(s) for s in shards], student, teacher, tokenizer, synthesis, tokenize,
                training, evaluation, promotion, register_as)
        await _steps(Runner(run, dry=True), {}, None, *args)  # every spec checked before a job
        refs: Refs = {}
        with tracked_flow({"drop": drop, "teacher": teacher, "register_as": register_as,
                           "student": student, "tokenizer": tokenizer, "synthesis": synthesis,
                           "tokenize": tokenize, "training": training, "evaluation": evaluation,
                           "promotion": promotion, "run": run}, refs) as parent:
            table, verdict = await _steps(Runner(run), refs, parent, *args)
            night = {"flow_run": str(flow_run.get_id()), "student": student,
                     "shards": [shard_id(s) for s in shards]}
            await settle(register_as, refs["convert"].registered, verdict, night)
            commit(register_as, shards, {**night, "promoted": verdict.promote})
            await publish_history(register_as, parent)
            await publish_summary(refs, details=f"{table}\n{_outcome(verdict)}\n")
            return refs
    finally:
        beating.cancel()
        lease.release()


def _student(name: str, bootstrap: str | None) -> str:
    """The champion of `name` now, else the bootstrap model (pinned)."""
    champion = current_champion(name)
    if champion is not None:
        return champion
    if bootstrap is None:
        raise InputError(f"registered model {name!r} has no champion yet: give bootstrap, the "
                         "first night's student")
    return pin(bootstrap)


async def _steps(runner: Runner, refs: Refs, parent_run: str | None, shards: list[str],
                 student_uri: str, teacher_uri: str, tokenizer: str | None,
                 synthesis: SynthesizeOptions | None, tokenize: TokenizeOptions,
                 training: NightlyTraining, evaluation: EvalParams, promotion: PromotionParams,
                 register_as: str) -> tuple[str, Verdict | None]:
    student, teacher = given_model(student_uri), given_model(teacher_uri)
    tokenizer = tokenizer or (student.path if student.hf else f"{student.path}/{TOKENIZER_DIR}")
    if _tokenizers_differ(teacher, student):
        if training.distill is not None:
            raise InputError(f"teacher {teacher.path} has another tokenizer than the student "
                             f"{student.path}: logit KD needs one; a teacher with its own "
                             f"tokenizer can only supply synthetic data (training.distill: null)")
        get_run_logger().info("the teacher has its own tokenizer: it supplies synthetic text "
                              "only, tokenized with the student's")
    blend = [await tokenize_files(runner, shards, tokenizer, tokenize, refs, "new")]
    if synthesis is not None:
        corpus = await synthesize_corpus(runner, synthesis, shards, teacher, None, refs)
        synthetic = await tokenize_files(runner, runner.files(corpus.path), tokenizer, tokenize,
                                         refs, "synthetic")
        weight = training.synthetic_weight
        blend = [str(1 - weight), blend[0], str(weight), synthetic]
    spec = merged(training.options, data__blend=blend, model=None,
                  load=await native_checkpoint(runner, student, refs))
    if training.distill is not None:
        spec["distill"] = merged(training.distill, teacher=await native_checkpoint(
            runner, teacher, refs, "convert (teacher)"))
    trained = await finetune_or_distill(runner, spec, refs, "train the student")
    candidate = await export_model(runner, training.export, trained.path, tokenizer, refs)
    refs["convert"] = await runner.register(
        refs, register_as, student_uri, None,
        {"teacher": teacher_uri, "shards": ",".join(Path(s).name for s in shards),
         "flow_run": str(flow_run.get_id())})
    table = await evaluate_side_by_side(
        runner, evaluation, {"champion": (student, None if student.hf else tokenizer),
                             "candidate": (candidate, None)},
        refs, parent_run, "champion-comparison", f"{register_as}: the night's candidate "
                                                 f"against {student_uri}")
    if runner.dry:
        return table, None
    return table, judge(refs["evaluate"].summary["metrics"],
                        refs["evaluate: champion"].summary["metrics"], promotion.metric,
                        promotion.min_improvement, promotion.higher_is_better)


def _tokenizers_differ(teacher: Model, student: Model) -> bool:
    """Whether both models' tokenizers are recorded and differ (logit KD compares the two
    distributions token by token: it needs one vocabulary)."""
    ours = checkpoint_tokenizers(Path(student.path))
    theirs = checkpoint_tokenizers(Path(teacher.path))
    return bool(ours and theirs and not ours & theirs)


def _outcome(verdict: Verdict) -> str:
    return f"**{'Promoted' if verdict.promote else 'Rejected'}**: {verdict.reason}."
