"""Data parallelism over the mesh's data-parallel ranks (and its context-parallel ones, which
hold the same weights): DDP for a model that is whole on every rank (no TP, no PP: the fastest
for small models, and the only one MasterAdamW's bf16 weights work with), otherwise FSDP2
`fully_shard` per block — sharded over dp_shard × cp (ZeRO-3 style: parameters, gradients and
optimizer state; Megatron's distributed optimizer and more), replicated over dp_replicate (HSDP
when both are > 1; plain replication when dp_shard × cp is 1, which is how "ddp" runs alongside
TP or PP). Under FSDP the parameters and optimizer state stay fp32 and a
MixedPrecisionPolicy gathers them in the compute dtype and reduces gradients in fp32; with CPU
offload those fp32 shards live in host memory and the optimizer steps there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                    fully_shard)

from engine.parallel.layout import DataParallel
from engine.parallel.mesh import Mesh

_COMPUTE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def uses_ddp(mode: DataParallel, mesh: Mesh) -> bool:
    return mode == "ddp" and mesh.layout.tp == mesh.layout.pp == 1


def apply_fsdp(parts: list[nn.Module], mode: DataParallel, mesh: Mesh, precision: str,
               forward_only: bool = False, cpu_offload: bool = False) -> None:
    """fully_shard each block and each model part (a pipeline stage, or the model) over the
    data-parallel sub-mesh; nothing when there is one data-parallel rank or DDP applies, unless
    the shards go to host memory (`cpu_offload`: then over one rank too).
    `forward_only` (a distillation teacher): the part's own parameters (embedding, norm, head)
    stay gathered after its forward, for the loss to read the head."""
    if uses_ddp(mode, mesh) or (mesh.layout.dp_cp == 1 and not cpu_offload):
        return
    dtype = _COMPUTE.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    offload = (CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload
               else OffloadPolicy())
    pipelined = mesh.layout.pp > 1
    dp_mesh = _shard_mesh(mesh)
    for part in parts:
        for block in part.layers.values():
            # under a pipeline schedule a stage's blocks run again for the backward of each
            # micro-batch: keeping them gathered saves an all-gather per micro-batch
            fully_shard(block, mesh=dp_mesh, mp_policy=policy, offload_policy=offload,
                        reshard_after_forward=not pipelined)
        fully_shard(part, mesh=dp_mesh, mp_policy=policy, offload_policy=offload,
                    reshard_after_forward=not (pipelined or forward_only))


def _shard_mesh(mesh: Mesh) -> DeviceMesh:
    """The ranks FSDP shards over: a 2-D mesh is its HSDP form (replicated over the first
    dimension, sharded over the second); context-parallel ranks hold the same weights, so they
    shard them too. One process (CPU offload) gets a mesh of its one rank."""
    if mesh.mesh is None:
        device = "cuda" if "nccl" in dist.get_backend() else "cpu"
        return init_device_mesh(device, (1,), mesh_dim_names=("dp_shard",))
    shard = "dp_shard_cp" if mesh.layout.cp > 1 else "dp_shard"
    if mesh.layout.dp_replicate > 1:
        return mesh.mesh["dp_replicate", shard]
    return mesh.mesh[shard]


def wrap_ddp(model: nn.Module, mode: DataParallel, mesh: Mesh, device: torch.device,
             overlap: bool = True) -> nn.Module:
    """DDP over every rank when it applies (see uses_ddp); the model unchanged otherwise.
    `overlap` false: the backward waits for each bucket's reduction."""
    if mesh.mesh is None or not uses_ddp(mode, mesh):
        return model
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # the gradients are views into DDP's buckets rather than a second copy of them
    ddp = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    hook = _fp32_mean if any(p.dtype != torch.float32 for p in model.parameters()) else None
    if not overlap:
        hook = _waited(hook or allreduce_hook)
    if hook is not None:
        ddp.register_comm_hook(None, hook)
    return ddp


def _waited(hook):
    """A communication hook whose reduction the backward waits for: on a GPU the compute
    stream waits for the collective, so none of it is hidden behind the rest of the backward."""
    def waited(state, bucket):
        future = hook(state, bucket)
        future.wait()
        return future
    return waited


def _fp32_mean(_state, bucket):  # no annotations: DDP checks them, and they would be strings here
    """DDP communication hook for bf16 gradients (a dist.GradBucket in, a Future of its tensor
    out): the mean over ranks is summed in fp32 and rounded to bf16 once (NCCL would round after
    every addition of a bf16 sum)."""
    buffer = bucket.buffer()
    total = buffer.float().div_(dist.get_world_size())

    def write_back(fut: torch.futures.Future) -> torch.Tensor:
        return buffer.copy_(fut.value()[0])

    return dist.all_reduce(total, async_op=True).get_future().then(write_back)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce gradients across ranks only on the last micro-batch of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP's flag behind no_sync()
        model.require_backward_grad_sync = enabled
