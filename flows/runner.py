"""How a flow's steps reach the stage task — for real, or as a dry run.

A flow runs its steps twice: first dry, where every stage's spec (with placeholders for outputs
not built yet) goes through the engine's full model and cluster/'s checks short of the live
cluster (the profile, its layout defaults, the layout over the stage's ranks) and nothing is
submitted, then for real. So a spec that only a cross-field check rejects (a bad evaluation
template, a finetune without a base, TP 2 on one rank) fails the flow before its first job, not
after hours of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.submit import prepare
from engine.data.tokenize import resolve_inputs
from flows.params import RunParams
from tasks.artifact import ArtifactRef, trained_ref
from tasks.models import SCHEME, record_evaluation, register_model
from tasks.options import validate_spec
from tasks.plan import recommended_layout
from tasks.stage import run_stage


@dataclass(frozen=True)
class Runner:
    run: RunParams
    dry: bool = False

    async def stage(self, stage: str, spec: dict[str, Any], label: str | None = None) -> ArtifactRef:
        if self.run.layout == "recommend":
            spec = recommended_layout(stage, spec, self.run.resources.get(stage), self.run.profile)
        if self.dry:  # the spec, and its layout on the profile's ranks
            prepare(stage, validate_spec(stage, spec), self.run.resources.get(stage),
                    self.run.profile)
            planned = f"<{label or stage}>"
            return ArtifactRef(stage=stage, kind="planned", path=planned, fingerprint="-",
                               cached=False, summary={}, files=[f"{planned}.bin"])
        return await run_stage(stage, spec, resources=self.run.resources.get(stage),
                               profile=self.run.profile, force=self.run.forced(stage), label=label)

    def files(self, corpus: str) -> list[str]:
        """The JSONL files of a corpus (file, folder or glob), one job each downstream."""
        if self.dry and corpus.startswith("<"):
            return [corpus]
        return [str(p) for p in resolve_inputs([corpus])]

    async def register(self, refs: dict[str, ArtifactRef], name: str | None, base: str | None,
                       aliases: list[str] | None,
                       lineage: dict[str, str] | None = None) -> ArtifactRef:
        """The HF export in `refs` registered as a version of `name` (None: not registered), with
        the training it came from (and `lineage` tags); the reference returned names the
        version, so the flow's summary links it."""
        export = refs["convert"]
        if self.dry or name is None:
            return export
        trained = trained_ref(refs)
        version = await register_model(export, name, trained, base, aliases, lineage)
        return export.model_copy(update={"registered": f"{SCHEME}{name}/{version}"})

    async def evaluated(self, report: ArtifactRef) -> None:
        """The evaluation's figures onto the registered versions of the model it evaluated."""
        if not self.dry:
            await record_evaluation(report)

