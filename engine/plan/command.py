"""`python -m engine plan`: the ranked layouts as Markdown on stdout (and JSON with --output)."""

from __future__ import annotations

import json

from engine.atomic import atomic_write_text
from engine.errors import InputError
from engine.model.config import ModelConfig
from engine.plan.check import gpu_named
from engine.plan.estimate import HEADROOM_GIB, Estimate
from engine.plan.report import markdown, record
from engine.plan.search import candidates, ranked
from engine.plan.spec import Spec
from engine.reshard.spec import model_config_of
from engine.train.spec import PretrainSpec


def plan(spec: Spec) -> tuple[ModelConfig, list[Estimate]]:
    model = spec.model or model_config_of(spec.load)
    if model is None:
        raise InputError(f"load {spec.load}: no model config there (an HF folder's config.json "
                         "or a native checkpoint)")
    world = spec.nodes * spec.gpus_per_node
    specs = candidates(spec.training(model), model, world, spec.gpus_per_node, PretrainSpec,
                       spec.fixed())
    return model, ranked(model, specs, world, gpu_named(spec.gpu), spec.gpus_per_node)


def title(spec: Spec, model: ModelConfig) -> str:
    params = f"{model.num_layers} layers × {model.hidden_size}"
    return (f"Plan: {params} ({model.num_parameters() / 1e9:.2f}B parameters), seq "
            f"{spec.seq_length}, batch {spec.global_batch_size}, {spec.nodes} × "
            f"{spec.gpus_per_node} {gpu_named(spec.gpu).name}")


def report(spec: Spec, model: ModelConfig, estimates: list[Estimate]) -> str:
    """The plan's Markdown table, the recommendation first."""
    gpu = gpu_named(spec.gpu)
    return markdown(title(spec, model), estimates, spec.rows, spec.tokens, gpu.name,
                    gpu.memory_gib - HEADROOM_GIB)


def run(spec: Spec) -> None:
    model, estimates = plan(spec)
    print(report(spec, model, estimates), end="")
    if spec.output:
        atomic_write_text(spec.output, json.dumps([record(e, spec.tokens) for e in estimates],
                                                  indent=1) + "\n")
