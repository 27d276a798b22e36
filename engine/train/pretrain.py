"""pretrain: train a Llama-family model on indexed datasets (from scratch, or continuing `load`
with its optimizer state and iteration count); resumes by itself from its own checkpoints."""

from engine.manifest import Manifest
from engine.train import loop
from engine.train.spec import PretrainSpec as Spec


def run(spec: Spec) -> Manifest | None:
    return loop.train(spec, "pretrain")
