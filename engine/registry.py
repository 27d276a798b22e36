"""The one table of stages: name -> module holding `Spec` (a StageSpec), `run(spec) -> Manifest`,
`input_paths(spec) -> {name: path}` (what engine.lineage fingerprints), `KIND` (the artifact kind),
`OUTPUT` (the dotted spec field naming where the artifact goes) and, optionally, `SETTINGS`: the
manifest summary's keys that describe the artifact (a model's shape, token ids) rather than
measure it, so that tracking records them as parameters, not metrics.

The CLI, cluster/ and tasks/ all go through it, so a new stage is one engine module plus one line
here. Modules are imported on first use so that listing stages never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

STAGES: dict[str, str] = {
    "generate-corpus": "engine.data.synthetic",
    "train-tokenizer": "engine.data.train_tokenizer",
    "tokenize": "engine.data.tokenize",
    "merge": "engine.data.merge",
    "convert": "engine.convert.stage",
    "pretrain": "engine.train.pretrain",
    "finetune": "engine.train.finetune",
    "evaluate": "engine.evaluate.stage",
}


@dataclass(frozen=True)
class Stage:
    name: str
    module: ModuleType

    @property
    def spec(self) -> type:
        return self.module.Spec

    @property
    def run(self) -> Callable:
        return self.module.run

    def input_paths(self, spec) -> dict[str, str]:
        """What the stage reads for `spec`, by input name (the names of its fingerprints)."""
        return {name: str(path) for name, path in self.module.input_paths(spec).items()}

    def fingerprint(self, spec) -> tuple[str, dict[str, str]]:
        """The fingerprint the stage's manifest will carry for `spec`, computed before running
        it, and its input fingerprints (engine.lineage)."""
        from engine.lineage import stage_fingerprint

        return stage_fingerprint(self.name, spec, self.module.input_paths(spec))

    @property
    def kind(self) -> str:
        return self.module.KIND

    @property
    def settings(self) -> tuple[str, ...]:
        return getattr(self.module, "SETTINGS", ())

    @property
    def output_field(self) -> str:
        return self.module.OUTPUT

    def output(self, spec) -> str | None:
        """Where the stage writes its artifact for `spec` (a folder, or a dataset prefix)."""
        value = spec
        for part in self.output_field.split("."):
            value = getattr(value, part)
        return value

    @property
    def doc(self) -> str:
        return (self.module.__doc__ or "").strip().splitlines()[0]


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    return Stage(name, importlib.import_module(STAGES[name]))
