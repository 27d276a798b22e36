"""The parameters one rank holds, element by element, as engine/parallel cuts the model: its
pipeline stages (split_layers, stage_ids: the embedding on the first stage, the final norm and
the head on the last), tensor parallelism's shards (column-parallel q/k/v, gate and up and the
head along their rows, row-parallel o and down along their columns, the embedding along the
vocabulary, norms whole), and FSDP2's dim-0 shards of those over the data-parallel (and
context-parallel) ranks, each rank's storage padded to the largest shard. Torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.model.config import ModelConfig
from engine.parallel.layout import Layout, split_layers, stage_ids


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    tp_dim: int | None  # the dimension tensor parallelism splits; None: whole on every rank

    @property
    def norm(self) -> bool:
        """A norm gain: kept fp32 beside bf16 weights (engine/train/master_adamw.norm_gains)."""
        return self.name.endswith("norm.weight")


@dataclass(frozen=True)
class Held:
    """A parameter as the most loaded rank of a pipeline rank holds it: the elements of its
    local shard (FSDP: the first rank's, the largest; the storage of the others is padded to
    it)."""

    param: Param
    numel: int


def layer_params(cfg: ModelConfig, i: int) -> list[Param]:
    h, q, kv, ffn = cfg.hidden_size, cfg.num_heads * cfg.head_dim, \
        cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    p = f"layers.{i}."
    out = [Param(p + "attn_norm.weight", (h,), None)]
    for name, rows in (("wq", q), ("wk", kv), ("wv", kv)):
        out.append(Param(f"{p}attn.{name}.weight", (rows, h), 0))
        if cfg.qkv_bias:
            out.append(Param(f"{p}attn.{name}.bias", (rows,), 0))
    return out + [Param(p + "attn.wo.weight", (h, q), 1), Param(p + "mlp_norm.weight", (h,), None),
                  Param(p + "mlp.w_gate.weight", (ffn, h), 0),
                  Param(p + "mlp.w_up.weight", (ffn, h), 0),
                  Param(p + "mlp.w_down.weight", (h, ffn), 1)]


def stage_params(cfg: ModelConfig, layers: range, first: bool, last: bool) -> list[Param]:
    """The parameters of one pipeline stage (the whole model: one stage of every layer)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    out = [Param("embed.weight", (v, h), 0)] if first else []
    for i in layers:
        out += layer_params(cfg, i)
    if last:
        out.append(Param("norm.weight", (h,), None))
        if not cfg.tie_word_embeddings:
            out.append(Param("lm_head.weight", (v, h), 0))
    return out


def rank_params(cfg: ModelConfig, layout: Layout, fsdp: bool, pp_rank: int = 0,
                schedule: str = "1f1b", virtual: int = 1,
                layers_per_stage: list[int] | None = None) -> list[Held]:
    """What pipeline rank `pp_rank` holds (every rank of one pipeline rank holds as much
    storage: TP needs divisible sizes, FSDP pads). `fsdp`: the parameters are sharded over the
    data-parallel ranks of a replica (times context parallel)."""
    stages = layout.pp * virtual
    ranges = split_layers(cfg.num_layers, stages, layers_per_stage)
    ids = stage_ids(schedule, pp_rank, layout.pp, virtual) if layout.pp > 1 else [0]
    shard = layout.dp_shard * layout.cp if fsdp else 1
    held = []
    for stage in ids:
        for p in stage_params(cfg, ranges[stage], stage == 0, stage == stages - 1):
            shape = list(p.shape)
            if p.tp_dim is not None:
                shape[p.tp_dim] //= layout.tp
            shape[0] = math.ceil(shape[0] / shard)
            held.append(Held(p, math.prod(shape)))
    return held
