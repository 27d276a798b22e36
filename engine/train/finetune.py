"""finetune: start from a checkpoint's weights with a fresh optimizer and iteration count."""

from engine.manifest import Manifest
from engine.train.loop import input_paths, train  # noqa: F401  (input_paths: engine.lineage)
from engine.train.spec import FinetuneSpec as Spec

KIND = "checkpoint"
OUTPUT = "checkpoint.save"  # the spec field naming the artifact this stage writes


def run(spec: Spec) -> Manifest | None:
    return train(spec, "finetune")
