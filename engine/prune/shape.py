"""The pruned model's shape, from the targets a user gives, checked before anything is loaded:
torch-free, so the spec refuses impossible targets before a job is queued.

Heads follow the grouping of GQA: whole KV groups go (each group keeps its query heads), or
query heads go within every group alike (the groups stay), or both; a multi-head model loses
query and KV heads together. A target parameter count shrinks the hidden size and the FFN width
by one ratio (the dimensions not given explicitly), the largest shape at or under the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.model.config import ModelConfig
from engine.parallel.layout import Layout, model_errors


@dataclass(frozen=True)
class Targets:
    """What the user asked for; None keeps the source's value."""

    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None
    drop_layers: tuple[int, ...] = ()
    target_parameters: int | None = None
    tensor_parallel: int = 1
    multiple_of: int = 1


def pruned_shape(cfg: ModelConfig, t: Targets) -> ModelConfig:
    """The pruned model's config; ValueError naming every target that cannot be met."""
    problems: list[str] = []
    layers = _layers(cfg, t, problems)
    heads, kv_heads = _heads(cfg, t, problems)
    hidden, ffn = _widths(cfg, t, layers, heads, kv_heads, problems)
    if problems:
        raise ValueError("; ".join(problems))
    new = _with(cfg, hidden, ffn, layers, heads, kv_heads)
    problems += _fit(cfg, new, t)
    if problems:
        raise ValueError("; ".join(problems))
    return new


def _with(cfg: ModelConfig, hidden: int, ffn: int, layers: int, heads: int,
          kv_heads: int) -> ModelConfig:
    # head_dim stays the source's whatever the hidden size becomes (a pruned hidden size need
    # not be heads × head_dim)
    return ModelConfig.model_validate({**cfg.model_dump(), "hidden_size": hidden,
                                       "intermediate_size": ffn, "num_layers": layers,
                                       "num_heads": heads, "num_kv_heads": kv_heads})


def _layers(cfg: ModelConfig, t: Targets, problems: list[str]) -> int:
    if t.drop_layers and t.num_layers is not None:
        problems.append("give num_layers or drop_layers, not both")
        return cfg.num_layers
    if t.drop_layers:
        outside = [i for i in t.drop_layers if not 0 <= i < cfg.num_layers]
        if outside:
            problems.append(f"drop_layers {outside} outside the model's layers 0..{cfg.num_layers - 1}")
        if len(set(t.drop_layers)) != len(t.drop_layers):
            problems.append(f"drop_layers {list(t.drop_layers)} names a layer twice")
        kept = cfg.num_layers - len(set(t.drop_layers))
        if kept < 1:
            problems.append(f"drop_layers removes all {cfg.num_layers} layers: at least one must stay")
        return max(kept, 1)
    layers = cfg.num_layers if t.num_layers is None else t.num_layers
    if not 1 <= layers <= cfg.num_layers:
        problems.append(f"num_layers {layers}: must be between 1 and the model's {cfg.num_layers}")
    return min(max(layers, 1), cfg.num_layers)


def _heads(cfg: ModelConfig, t: Targets, problems: list[str]) -> tuple[int, int]:
    group = cfg.num_heads // cfg.num_kv_heads
    heads, kv_heads = t.num_heads, t.num_kv_heads
    if heads is None and kv_heads is None:
        return cfg.num_heads, cfg.num_kv_heads
    if kv_heads is None:  # multi-head: KV heads go with their query heads; GQA: groups stay
        kv_heads = heads if group == 1 else cfg.num_kv_heads
    if heads is None:  # whole groups go
        heads = kv_heads * group
    if not 1 <= kv_heads <= cfg.num_kv_heads:
        problems.append(f"num_kv_heads {kv_heads}: must be between 1 and the model's "
                        f"{cfg.num_kv_heads}")
    elif heads % kv_heads or not kv_heads <= heads <= kv_heads * group:
        problems.append(f"num_heads {heads} with num_kv_heads {kv_heads}: each of the "
                        f"{kv_heads} KV group(s) must keep the same number of its {group} query "
                        f"head(s) (num_heads a multiple of num_kv_heads, at most {kv_heads * group})")
    return heads, kv_heads


def _widths(cfg: ModelConfig, t: Targets, layers: int, heads: int, kv_heads: int,
            problems: list[str]) -> tuple[int, int]:
    hidden = cfg.hidden_size if t.hidden_size is None else t.hidden_size
    ffn = cfg.intermediate_size if t.intermediate_size is None else t.intermediate_size
    if t.target_parameters is None:
        return hidden, ffn
    free = [name for name, given in (("hidden_size", t.hidden_size),
                                      ("intermediate_size", t.intermediate_size)) if given is None]
    if not free:
        problems.append("target_parameters needs hidden_size or intermediate_size left free "
                        "(it chooses them)")
        return hidden, ffn

    def shape(ratio: float) -> tuple[int, int]:
        return (_round_down(cfg.hidden_size * ratio, t.multiple_of) if "hidden_size" in free
                else hidden,
                _round_down(cfg.intermediate_size * ratio, math.lcm(t.multiple_of,
                                                                   t.tensor_parallel))
                if "intermediate_size" in free else ffn)

    def count(ratio: float) -> int:
        return _with(cfg, *shape(ratio), layers, heads, kv_heads).num_parameters()

    if count(0.0) > t.target_parameters:
        problems.append(f"target_parameters {t.target_parameters:,} is below the smallest shape "
                        f"these targets allow ({count(0.0):,} parameters with {' and '.join(free)} "
                        f"at their minimum)")
        return hidden, ffn
    low, high = 0.0, 1.0  # count(low) <= target; the largest such ratio
    if count(high) <= t.target_parameters:
        return shape(high)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if count(mid) <= t.target_parameters else (low, mid)
    return shape(low)


def _round_down(value: float, multiple: int) -> int:
    return max(multiple, int(value) // multiple * multiple)


def _fit(cfg: ModelConfig, new: ModelConfig, t: Targets) -> list[str]:
    """Each width within the source's and a multiple of `multiple_of`; heads, KV heads and the
    FFN width divisible by the planned tensor parallelism."""
    problems = []
    for name in ("hidden_size", "intermediate_size"):
        value, source = getattr(new, name), getattr(cfg, name)
        if not 1 <= value <= source:
            problems.append(f"{name} {value}: must be between 1 and the model's {source}")
        elif value % t.multiple_of:
            problems.append(f"{name} {value} is not a multiple of multiple_of {t.multiple_of}")
    problems += model_errors(Layout(tp=t.tensor_parallel), new.num_heads, new.num_kv_heads,
                             new.intermediate_size, new.vocab_size, new.num_layers, 1)
    return [p.replace("model ", "pruned ", 1) for p in problems]


def balance_errors(cfg: ModelConfig, tensor_parallel: int) -> list[str]:
    """prune_type balance keeps the same count from each tensor-parallel rank's slice: the
    source's heads, KV heads and FFN width must split evenly over them too."""
    return [f"model {name} {value} is not divisible by tensor_parallel {tensor_parallel} "
            f"(prune_type balance prunes each rank's slice alike)"
            for name, value in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                                ("intermediate_size", cfg.intermediate_size))
            if value % tensor_parallel]
