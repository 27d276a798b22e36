"""The one table of stages: name -> module holding `Spec` (a StageSpec) and `run(spec) -> Manifest`.

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

    @property
    def doc(self) -> str:
        return (self.module.__doc__ or "").strip().splitlines()[0]


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    return Stage(name, importlib.import_module(STAGES[name]))
