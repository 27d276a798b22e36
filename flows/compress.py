"""The compress flow: prune-then-recover (docs/pruning.md).

    prune (importance on calibration data) -> finetune the pruned model (distillation from the
    parent, converted to native if HF; or plain CE) -> (convert native -> HF -> register) ->
    evaluate the parent, the pruned and the recovered model

and one table of the three side by side — parameters, PPL, FinEval, scoring tokens/s — as a
Prefect artifact and in the flow's MLflow parent run, with each model's figures as its metrics.
"""

from __future__ import annotations

from prefect import flow

from engine.formats import TOKENIZER_DIR
from flows.params import EvalParams, PruneOptions, RecoveryParams, RunParams
from flows.runner import Runner
from flows.steps import (Model, Refs, evaluate_side_by_side, export_model,
                         finetune_or_distill, given_model, native_checkpoint)
from tasks.fields import merged
from tasks.models import pin
from tasks.run_tags import tag_flow_run
from tasks.summary import publish_summary
from tasks.tracking import tracked_flow

@flow(name="compress")
async def compress(model: str, dataset: str, calibration: str | None = None,
                   tokenizer: str | None = None, pruning: PruneOptions = PruneOptions(),
                   recovery: RecoveryParams = RecoveryParams(),
                   evaluation: EvalParams | None = EvalParams(), register_as: str | None = None,
                   aliases: list[str] | None = None, run: RunParams = RunParams()) -> Refs:
    """Returns a reference to every artifact it made or found.

    Args:
        model: the parent: an HF folder, a native checkpoint, or models:/NAME/VERSION|latest|@ALIAS.
        dataset: indexed dataset prefix in the parent's tokenizer: the recovery's training data.
        calibration: what importance is measured on (a dataset prefix or JSONL); None: `dataset`.
        tokenizer: the parent's, when it has none beside it (evaluation, JSONL calibration).
        pruning: the targets (hidden_size, num_heads, num_kv_heads, intermediate_size,
            num_layers or drop_layers, or target_parameters) and the importance method.
        recovery: the finetune, distillation from the parent (None: plain CE), the HF export.
        evaluation: the same suites for all three models; None: no evaluation.
        register_as: MLflow registered model name for the recovered model's HF export.
        aliases: registry aliases moved to the new version, besides `latest-compress`.
        run: cluster profile, per-stage resources, forced rebuilds.
    """
    await tag_flow_run(run.profile)
    model = pin(model)  # `latest` now: the run records, and uses, that version
    args = (model, dataset, calibration, tokenizer, pruning, recovery, evaluation, register_as,
            aliases)
    await _steps(Runner(run, dry=True), {}, None, *args)  # every spec checked before a job
    refs: Refs = {}
    with tracked_flow({"model": model, "dataset": dataset, "calibration": calibration,
                       "tokenizer": tokenizer, "pruning": pruning, "recovery": recovery,
                       "evaluation": evaluation, "register_as": register_as,
                       "aliases": aliases, "run": run}, refs) as parent:
        table = await _steps(Runner(run), refs, parent, *args)
        await publish_summary(refs, details=table)
        return refs


async def _steps(runner: Runner, refs: Refs, parent_run: str | None, model: str, dataset: str,
                 calibration: str | None, tokenizer: str | None, pruning: PruneOptions,
                 recovery: RecoveryParams, evaluation: EvalParams | None,
                 register_as: str | None, aliases: list[str] | None) -> str:
    parent = given_model(model)
    refs["prune"] = pruned = await runner.stage(
        "prune", merged(pruning, input=parent.path, calibration=calibration or dataset,
                        tokenizer=pruning.tokenizer or tokenizer))
    spec = merged(recovery.options, data__blend=[dataset], load=pruned.path, model=None)
    if recovery.distill is not None:  # the teacher: the parent, as a native checkpoint
        teacher = await native_checkpoint(runner, parent, refs)
        spec["distill"] = merged(recovery.distill, teacher=teacher)
    recovered = await finetune_or_distill(runner, spec, refs, "recover")
    # the parent's tokenizer, which prune carries beside the pruned checkpoint
    tokenizer = tokenizer or f"{pruned.path}/{TOKENIZER_DIR}"
    result = Model(recovered.path, hf=False)
    if recovery.export is not None:
        result = await export_model(runner, recovery.export, recovered.path, tokenizer, refs)
        refs["convert"] = await runner.register(refs, register_as, model, aliases)
    if evaluation is None:
        return ""
    pruned_model = Model(pruned.path, hf=False)
    own = None if result.hf else tokenizer
    table = await evaluate_side_by_side(
        runner, evaluation, {"parent": (parent, None), "pruned": (pruned_model, tokenizer),
                             "recovered": (result, own)},
        refs, parent_run, "compression", f"{model}: parent, pruned and recovered")
    if runner.dry:
        return ""
    done = recovered.summary
    return (f"{table}\nRecovery: {done.get('iterations')} iterations, {done.get('tokens'):,} "
            f"tokens, last loss {done.get('loss')}, {done.get('tokens_per_s')} tokens/s.\n")
