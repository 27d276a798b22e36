"""One layout's prediction: the memory of its most loaded GPU and its step time. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from engine.model.config import ModelConfig
from engine.parallel.layout import Layout, float8_blocks
from engine.plan.memory import (GIB, Memory, fsdp_wraps, layer_activations,
                                rank_memory, shape, sharded, spec_params)
from engine.plan.timing import Gpu, Timing, step_timing

HEADROOM_GIB = 2.0  # CUDA context, NCCL buffers, the allocator's fragmentation


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    fields: dict          # the training spec's layout fields that give this layout
    memory: Memory        # the most loaded GPU's
    timing: Timing
    tokens_per_step: int
    usable_gib: float     # the GPU's memory less the headroom

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable_gib * GIB

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.timing.step_s

    def days(self, tokens: float) -> float:
        return tokens / self.tokens_per_s / 86400

    def describe(self) -> str:
        f = self.fields
        parts = [f"tp {self.layout.tp}", f"pp {self.layout.pp}"]
        if self.layout.pp > 1:
            parts[-1] += f" ({f['pipeline_schedule']}" + (
                f", v {f['virtual_stages']})" if f["virtual_stages"] > 1 else ")")
        if self.layout.cp > 1:
            parts.append(f"cp {self.layout.cp}")
        dp = f"{f['data_parallel']} {self.layout.dp}"
        if self.layout.dp_replicate > 1 and f["data_parallel"] == "fsdp":
            dp += f" ({self.layout.dp_replicate}×{self.layout.dp_shard})"
        if f["cpu_offload"]:
            dp += f" + cpu offload ({self.memory.host / GIB:.0f} GiB host)"
        return ", ".join(parts + [dp, f"mb {f['micro_batch_size']}", f"recompute {f['recompute']}",
                                  f["precision"]])


def estimate(cfg: ModelConfig, spec, world_size: int, gpu: Gpu, gpus_per_node: int) -> Estimate:
    """`spec`: a TrainSpec (its layout fields, precision, batch and sequence)."""
    layout = spec.layout(world_size)
    held = [spec_params(cfg, spec, layout, r) for r in range(layout.pp)]
    memory = max((rank_memory(cfg, spec, layout, r, h) for r, h in enumerate(held)),
                 key=lambda m: m.total)
    params = max(sum(h.numel for h in rank) for rank in held)
    fsdp = sharded(spec, layout)
    timing = step_timing(cfg, layout, gpu, seq=spec.data.seq_length,
                         global_batch=spec.global_batch_size,
                         micro_batch=spec.micro_batch_size, recompute=spec.recompute,
                         precision=spec.precision, fsdp=fsdp, schedule=spec.pipeline_schedule,
                         virtual=spec.virtual_stages, gpus_per_node=gpus_per_node,
                         params_per_gpu=params, compiled=spec.compile,
                         float8_layers=float8_layers(cfg, spec), cpu_offload=spec.cpu_offload,
                         overlap_grad_reduce=spec.overlap_grad_reduce,
                         **_elementwise(cfg, spec, layout))
    fields = {k: getattr(spec, k) for k in LAYOUT_FIELDS}
    return Estimate(layout, fields, memory, timing,
                    spec.global_batch_size * spec.data.seq_length,
                    gpu.memory_gib - HEADROOM_GIB)


def _elementwise(cfg: ModelConfig, spec, layout: Layout) -> dict:
    """The non-matmul memory traffic of a GPU's step: each block's activations (without
    recompute) written once and read twice, and what recompute rebuilds written again; and the
    block forward-backwards it runs."""
    s = shape(cfg, spec.precision, layout.tp, spec.sequence_parallel, fsdp_wraps(spec, layout))
    tokens = spec.micro_batch_size * spec.data.seq_length // layout.cp
    whole = layer_activations(s, tokens, "none", spec.precision, layout.cp)
    rebuilt = whole - layer_activations(s, tokens, spec.recompute, spec.precision, layout.cp)
    blocks = cfg.num_layers // layout.pp * spec.micro_batches(layout)
    casts = float8_layers(cfg, spec) / cfg.num_layers * blocks * _float8_casts(cfg, tokens)
    return {"elementwise_bytes": blocks * (3 * whole + 2 * rebuilt) + casts, "blocks": blocks}


def float8_layers(cfg: ModelConfig, spec) -> int:
    """The model's layers whose matmuls run in float8 (all but the first and last few)."""
    return len(float8_blocks(cfg.num_layers, spec.float8.bf16_blocks)) if spec.float8 else 0


def _float8_casts(cfg: ModelConfig, tokens: int) -> float:
    """Bytes a float8 block moves a micro-batch to cast its linears' operands (torchao,
    dynamic scales): each bf16 input read for its scale, read again and written in float8 (5
    bytes an element), forward and again transposed for the weight gradient; each output
    gradient once; each weight forward and backward."""
    h, q = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    kv, f = cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    inputs = 5 * h + q + f            # wq, wk, wv, gate, up read h; wo reads q; down reads f
    outputs = q + 2 * kv + 2 * h + 2 * f
    weights = h * (2 * q + 2 * kv + 3 * f)
    return 5 * (tokens * (2 * inputs + outputs) + 2 * weights)


LAYOUT_FIELDS = ("tensor_parallel", "sequence_parallel", "pipeline_parallel",
                 "pipeline_schedule", "virtual_stages", "context_parallel", "data_parallel",
                 "data_parallel_replicate", "cpu_offload", "micro_batch_size", "recompute",
                 "precision")
