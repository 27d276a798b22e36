"""pretrain: train a Llama-family model on indexed datasets (from scratch, or continuing `load`
with its optimizer state and iteration count); resumes by itself from its own checkpoints."""

from engine.manifest import Manifest
from engine.train import loop
from engine.train.spec import PretrainSpec as Spec

KIND = "checkpoint"
OUTPUT = "checkpoint.save"  # the spec field naming the artifact this stage writes
SETTINGS = loop.SETTINGS  # summary keys that describe, not measure

input_paths = loop.input_paths  # what engine.lineage fingerprints


def run(spec: Spec) -> Manifest | None:
    return loop.train(spec, "pretrain")
