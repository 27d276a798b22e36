"""Build the model for training, in the order that keeps every rank small: on the meta device,
cut into this rank's pipeline stages (with pipeline parallelism), then each part parallelized
(tensor parallel, recompute, compile, FSDP), then materialised and initialised — each rank only
ever allocates its own shards of its own stages, and the init draws every parameter by its
global name, so the weights equal one process's. DDP and MasterAdamW, which need the whole
model, come after."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel, local_shard
from engine.parallel.context_parallel import apply_context_parallel
from engine.parallel.data_parallel import apply_fsdp, wrap_ddp
from engine.parallel.float8 import apply_float8
from engine.parallel.mesh import Mesh
from engine.parallel.pipeline import (LocalStages, build_schedule, fused_loss_fn,
                                      pipeline_stages, stage_modules)
from engine.parallel.recompute import apply_recompute
from engine.parallel.tensor_parallel import apply_tensor_parallel
from engine.train.held import storage_bytes
from engine.train.master_adamw import MasterAdamW, norm_gains
from engine.train.spec import TrainSpec

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """This rank's share of the pipeline: torch's schedule over its stages, and whether it runs
    the first stage (feeds the inputs) and the last (computes the loss)."""

    schedule: object
    is_first: bool
    is_last: bool


@dataclass
class Built:
    # what the forward and backward go through (DDP's wrapper, or the model); under pipeline
    # parallelism this rank's stages as one module under the model's names (LocalStages), for
    # checkpoints and checks — the schedule runs them
    model: nn.Module
    optimizer: torch.optim.Optimizer
    parameters: int   # the whole model's, however it is split
    pipeline: Pipeline | None = None


def build(cfg: ModelConfig, spec: TrainSpec, mesh: Mesh, device: torch.device) -> Built:
    torch.manual_seed(spec.seed)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    parameters = sum(p.numel() for p in model.parameters())
    parts = _parts(model, spec, mesh)
    for part in parts.values():
        _parallelize(part, spec, mesh, device)
    apply_fsdp(list(parts.values()), spec.data_parallel, mesh, spec.precision,
               cpu_offload=spec.cpu_offload)
    for part in parts.values():  # FSDP copies offloaded shards to the GPU itself
        part.to_empty(device="cpu" if spec.cpu_offload else device)
        part.init_weights(spec.seed)
    _log_size(parts.values(), parameters, device)
    if mesh.layout.pp > 1:
        local = LocalStages(parts)
        return Built(local, _optimizer(local, spec, device), parameters,
                     _pipeline(parts, spec, mesh, device))
    if spec.precision == "bf16-master":  # DDP must see the bf16 weights that MasterAdamW makes
        optimizer = _optimizer(model, spec, device)
        return Built(wrap_ddp(model, spec.data_parallel, mesh, device,
                              spec.overlap_grad_reduce), optimizer, parameters)
    model = wrap_ddp(model, spec.data_parallel, mesh, device, spec.overlap_grad_reduce)
    return Built(model, _optimizer(model, spec, device), parameters)


def _parts(model: LlamaModel, spec: TrainSpec, mesh: Mesh) -> dict[int, LlamaModel]:
    """This rank's pipeline stages by stage id (still on the meta device); the model itself as
    stage 0 without a pipeline."""
    if mesh.layout.pp == 1:
        return {0: model}
    return stage_modules(model, spec.pipeline_schedule, mesh.coordinate("pp"), mesh.layout.pp,
                         spec.virtual_stages, spec.pipeline_layers)


def _parallelize(part: LlamaModel, spec: TrainSpec, mesh: Mesh, device: torch.device) -> None:
    tp_mesh = mesh.sub("tp")
    if tp_mesh is not None:
        apply_tensor_parallel(part, tp_mesh, spec.sequence_parallel)
    if mesh.groups["cp"] is not None:
        apply_context_parallel(part, mesh.groups["cp"], spec.data.seq_length)
    if spec.float8 is not None:
        apply_float8(part, spec.float8.recipe, spec.float8.bf16_blocks, device)
    apply_recompute(part, spec.recompute)
    if spec.compile:
        for block in part.layers.values():
            block.compile()


def _pipeline(parts: dict[int, LlamaModel], spec: TrainSpec, mesh: Mesh,
              device: torch.device) -> Pipeline:
    """The schedule over this rank's materialised stages; the last stage's loss is the fused
    head + cross-entropy (vocab-parallel under TP)."""
    num_stages = spec.pipeline_stages
    stages = pipeline_stages(parts, num_stages, mesh.groups["pp"], device)
    last = parts.get(num_stages - 1)
    loss_fn = fused_loss_fn(last) if last is not None else None
    schedule = build_schedule(spec.pipeline_schedule, stages, spec.micro_batches(mesh.layout),
                              loss_fn)
    return Pipeline(schedule, 0 in parts, last is not None)


def _log_size(parts, parameters: int, device: torch.device) -> None:
    """What this rank allocated for parameters: its shards of its stages (the storage of each
    local tensor, so padding and anything materialised whole count)."""
    held = storage_bytes(local_shard(p.data) for part in parts for p in part.parameters())
    log.info("this rank holds %d parameter bytes of the model's %d (%d parameters, fp32)",
             held, 4 * parameters, parameters)
    if device.type == "cuda":
        log.info("model materialised: %.2f GiB on this rank",
                 torch.cuda.memory_allocated(device) / 2**30)


def _optimizer(model: nn.Module, spec: TrainSpec, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices but the embedding; MasterAdamW (its update
    compiled on CUDA, where torch's AdamW is fused) or torch's AdamW, fused on CUDA and on
    offloaded shards (host memory)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    o = spec.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if spec.precision == "bf16-master":
        return MasterAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                           keep_fp32=norm_gains(model), compile=device.type == "cuda")
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=device.type == "cuda" or spec.cpu_offload)
