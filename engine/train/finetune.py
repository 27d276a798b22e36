"""finetune: start from a checkpoint's weights with a fresh optimizer and iteration count."""

from engine.manifest import Manifest
from engine.train import loop
from engine.train.spec import FinetuneSpec as Spec


def run(spec: Spec) -> Manifest | None:
    return loop.train(spec, "finetune")
