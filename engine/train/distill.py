"""distill: finetune a student against a frozen teacher (engine/model/kd_loss.py)."""

from engine.manifest import Manifest
from engine.train import loop
from engine.train.spec import DistillSpec as Spec


def run(spec: Spec) -> Manifest | None:
    return loop.train(spec, "distill")
