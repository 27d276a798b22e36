"""Build the model for training, in the order that keeps every rank small: on the meta device,
then parallelized (tensor parallel, recompute, compile, FSDP), then materialised and initialised
— each rank only ever allocates its own shards. DDP and MasterAdamW, which need the whole
model, come after."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.parallel.data_parallel import apply_fsdp, wrap_ddp
from engine.parallel.mesh import Mesh
from engine.parallel.recompute import apply_recompute
from engine.parallel.tensor_parallel import apply_tensor_parallel
from engine.train.master_adamw import MasterAdamW, norm_gains
from engine.train.spec import TrainSpec

log = logging.getLogger(__name__)


@dataclass
class Built:
    model: nn.Module  # what the forward and backward go through (DDP's wrapper, or the model)
    optimizer: torch.optim.Optimizer
    parameters: int   # the whole model's, however it is split


def build(cfg: ModelConfig, spec: TrainSpec, mesh: Mesh, device: torch.device) -> Built:
    torch.manual_seed(spec.seed)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    parameters = sum(p.numel() for p in model.parameters())
    tp_mesh = mesh.sub("tp")
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh, spec.sequence_parallel)
    apply_recompute(model, spec.recompute)
    if spec.compile:
        for block in model.layers.values():
            block.compile()
    apply_fsdp([model], spec.data_parallel, mesh, spec.precision)
    model.to_empty(device=device)
    model.init_weights(spec.seed)
    if device.type == "cuda":
        log.info("model materialised: %.2f GiB of parameters on this rank",
                 torch.cuda.memory_allocated(device) / 2**30)
    if spec.precision == "bf16-master":  # DDP must see the bf16 weights that MasterAdamW makes
        optimizer = _optimizer(model, spec, device)
        return Built(wrap_ddp(model, spec.data_parallel, mesh, device), optimizer, parameters)
    model = wrap_ddp(model, spec.data_parallel, mesh, device)
    return Built(model, _optimizer(model, spec, device), parameters)


def _optimizer(model: nn.Module, spec: TrainSpec, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices but the embedding; MasterAdamW (its update
    compiled on CUDA, where torch's AdamW is fused) or torch's fused AdamW."""
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
                             fused=device.type == "cuda")
