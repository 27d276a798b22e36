"""finetune: start from a checkpoint's weights with a fresh optimizer and iteration count."""

from engine.manifest import Manifest
from engine.train import loop
from engine.train.spec import FinetuneSpec as Spec

KIND = "checkpoint"
OUTPUT = "checkpoint.save"  # the spec field naming the artifact this stage writes
SETTINGS = loop.SETTINGS  # summary keys that describe, not measure

input_paths = loop.input_paths  # what engine.lineage fingerprints


def run(spec: Spec) -> Manifest | None:
    return loop.train(spec, "finetune")
