"""Activation recompute per transformer block: "full" keeps only each block's input and runs
the block's forward again in the backward; "selective" keeps the outputs of the matmuls,
attention kernels and tensor-parallel reductions (the expensive ops) and recomputes the rest —
norms, RoPE, SiLU and the elementwise products, whose activations are the bulk of the memory
but cost little to redo."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from engine.parallel.layout import Recompute

_aten = torch.ops.aten
_KEEP = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default,
         _aten._scaled_mm.default,  # float8 linears (engine/parallel/float8.py)
         _aten._scaled_dot_product_efficient_attention.default,
         _aten._scaled_dot_product_flash_attention.default,
         _aten._scaled_dot_product_cudnn_attention.default,
         _aten._scaled_dot_product_flash_attention_for_cpu.default,
         torch.ops._c10d_functional.reduce_scatter_tensor.default,
         torch.ops._c10d_functional.all_reduce.default}


def _policy(_ctx, op, *args, **kwargs) -> CheckpointPolicy:
    keep = op in _KEEP or getattr(op, "namespace", "") == "lmforge"  # the custom attention ops
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(model: nn.Module, mode: Recompute) -> None:
    """Wrap each of the model's blocks (in its `layers` ModuleDict) for `mode`."""
    if mode == "none":
        return
    extra = {} if mode == "full" else {
        "context_fn": partial(create_selective_checkpoint_contexts, _policy)}
    for name, block in model.layers.items():
        # the blocks draw no random numbers (no dropout): no RNG state to replay
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False, **extra)
