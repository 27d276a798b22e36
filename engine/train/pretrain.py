"""pretrain: train a Llama-family model on indexed datasets (from scratch, or continuing `load`
with its optimizer state and iteration count); resumes by itself from its own checkpoints."""

from engine.manifest import Manifest
from engine.train.loop import input_paths, train  # noqa: F401  (input_paths: engine.lineage)
from engine.train.spec import PretrainSpec as Spec

KIND = "checkpoint"
OUTPUT = "checkpoint.save"  # the spec field naming the artifact this stage writes


def run(spec: Spec) -> Manifest | None:
    return train(spec, "pretrain")
