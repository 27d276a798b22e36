"""The extend flow: a model's context extended (docs/training.md, "Context extension").

    the extend stage (RoPE rewritten, weights unchanged) -> (finetune at the new length on
    `dataset`) -> (convert native -> HF -> register) -> evaluate the base and the extended
    model alike (windows at each length, passkey) -> one comparison

published as the compress flow's is (tasks/comparison.py): a Prefect artifact `extension`, and
`comparison.md`/`.png` and `base/…`, `extended/…` metrics in the flow's MLflow parent run.
"""

from __future__ import annotations

from prefect import flow

from engine.formats import TOKENIZER_DIR
from engine.train.context import ContextSection
from flows.params import (EvalParams, ExportOptions, RunParams, TrainOptions,
                          cookbook_extension)
from flows.runner import Runner
from flows.steps import Model, Refs, evaluate_side_by_side, export_model, given_model
from tasks.fields import merged
from tasks.models import pin
from tasks.run_tags import tag_flow_run
from tasks.summary import publish_summary
from tasks.tracking import tracked_flow

@flow(name="extend")
async def extend(model: str, context: ContextSection, dataset: str | None = None,
                 tokenizer: str | None = None,
                 training: TrainOptions | None = cookbook_extension(),
                 export: ExportOptions | None = ExportOptions(),
                 evaluation: EvalParams | None = EvalParams(), register_as: str | None = None,
                 aliases: list[str] | None = None, run: RunParams = RunParams()) -> Refs:
    """Returns a reference to every artifact it made or found.

    Args:
        model: an HF folder, a native checkpoint, or models:/NAME/VERSION|latest|@ALIAS.
        context: the new maximum length and the RoPE method (linear, dynamic, yarn, llama3;
            dynamic is not trained).
        dataset: indexed dataset prefix of long text, in the model's tokenizer: the continued
            training's data (with `training`).
        tokenizer: the model's, when it has none beside it.
        training: the finetune's options at the new length (data.seq_length up to
            context.max_length); default: the Cookbook's recipe (1,000 steps of 128 × 8,192
            tokens, lr 2e-5 -> 2e-6 cosine, warmup 30, selective recompute); None: no
            training (the extend stage's checkpoint is the result).
        export: convert the extended model to an HF folder; None: keep the native checkpoint.
        evaluation: the same for both models; give ppl data of long documents, windows at each
            length (e.g. ["512", "1024", "2048"]) and passkey lengths.
        register_as: MLflow registered model name for the HF export.
        aliases: registry aliases moved to the new version, besides `latest-extend`.
        run: cluster profile, per-stage resources, forced rebuilds.
    """
    await tag_flow_run(run.profile)
    model = pin(model)  # `latest` now: the run records, and uses, that version
    args = (model, context, dataset, tokenizer, training, export, evaluation, register_as,
            aliases)
    await _steps(Runner(run, dry=True), {}, None, *args)  # every spec checked before a job
    refs: Refs = {}
    with tracked_flow({"model": model, "context": context, "dataset": dataset,
                       "tokenizer": tokenizer, "training": training, "export": export,
                       "evaluation": evaluation, "register_as": register_as,
                       "aliases": aliases, "run": run}, refs) as parent:
        table = await _steps(Runner(run), refs, parent, *args)
        await publish_summary(refs, details=table)
        return refs


async def _steps(runner: Runner, refs: Refs, parent_run: str | None, model: str,
                 context: ContextSection, dataset: str | None, tokenizer: str | None,
                 training: TrainOptions | None, export: ExportOptions | None,
                 evaluation: EvalParams | None, register_as: str | None,
                 aliases: list[str] | None) -> str:
    base = given_model(model)
    own = context.model_dump(mode="json")
    refs["extend"] = extended = await runner.stage("extend", {"input": base.path,
                                                              "context": own})
    # the base's tokenizer, which the extend stage carries beside its checkpoint
    tokenizer = tokenizer or f"{extended.path}/{TOKENIZER_DIR}"
    if training is not None:
        if dataset is None:
            raise ValueError("training needs dataset: the long text to train at the new "
                             "length (or set training to null: an extension without training)")
        spec = merged(training, data__blend=[dataset], model=None, context=own,
                      load=extended.path)  # context again: checks data.seq_length against it
        refs["finetune"] = extended = await runner.stage("finetune", spec, label="train extended")
    result = Model(extended.path, hf=False)
    if export is not None:
        result = await export_model(runner, export, extended.path, tokenizer, refs)
        refs["convert"] = await runner.register(refs, register_as, model, aliases)
    if evaluation is None:
        return ""
    return await evaluate_side_by_side(
        runner, evaluation, {"base": (base, None if base.hf else tokenizer),
                             "extended": (result, None if result.hf else tokenizer)},
        refs, parent_run, "extension", f"{model}: base and extended to {context.max_length}")
