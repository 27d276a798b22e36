"""The check before a training job is queued (cluster/submit.py): the spec's layout on the
submission's GPUs, refused when it is predicted not to fit, with the numbers and the layouts
that would. Torch-free."""

from __future__ import annotations

from engine.errors import SpecError
from engine.model.config import ModelConfig
from engine.plan.estimate import Estimate, estimate
from engine.plan.memory import GIB
from engine.plan.report import gib
from engine.plan.search import alternatives
from engine.plan.timing import Gpu, gpus
from engine.reshard.spec import model_config_of
from engine.train.spec import default_precision


def gpu_named(name: str) -> Gpu:
    """A row of gpus.json, whatever the case of `name` ('h200' is 'H200')."""
    table = gpus()
    by_lower = {key.lower(): gpu for key, gpu in table.items()}
    if name.lower() not in by_lower:
        raise SpecError(f"GPU {name!r} is not in engine/plan/gpus.json; one of {sorted(table)}")
    return by_lower[name.lower()]


def spec_model(spec) -> ModelConfig | None:
    """The architecture a training spec trains: its own, else its checkpoint's (None when
    unreadable: the stage will say why)."""
    return spec.model or (model_config_of(spec.load) if spec.load else None)


def check_fits(spec, world_size: int, gpu_name: str, gpus_per_node: int) -> Estimate | None:
    """The estimate of `spec` (a TrainSpec) on `world_size` GPUs of `gpu_name`; SpecError when
    its most loaded GPU is predicted to need more than the GPU holds."""
    cfg = spec_model(spec)
    if cfg is None:
        return None
    gpu = gpu_named(gpu_name)
    found = estimate(cfg, spec, world_size, gpu, gpus_per_node)
    if found.fits:
        return found
    m = found.memory
    parts = ", ".join(f"{k} {gib(v)}" for k, v in m.as_dict().items() if v and k != "total")
    # a precision the layout chose by default follows the layout; one named stays
    defaulted = spec.precision == default_precision(spec.model_dump(mode="json"))
    fixed = {} if defaulted else {"precision": spec.precision}
    others = alternatives(spec, cfg, world_size, gpu, gpus_per_node, fixed)
    fitting = [e for e in others if e.fits][:3]
    hint = ("; layouts that fit, fastest first: " + "; ".join(
        f"{e.describe()} ({gib(e.memory.total)} GiB, {e.tokens_per_s:,.0f} tokens/s)"
        for e in fitting)) if fitting else \
        f"; no layout on {world_size} GPUs fits: more GPUs, or a shorter sequence"
    raise SpecError(f"{found.describe()} on {world_size} × {gpu.name} is predicted to need "
                    f"{gib(m.total)} GiB per GPU ({parts}), {gib(m.total - found.usable_gib * GIB)}"
                    f" GiB more than the {found.usable_gib:.1f} GiB usable{hint}")
