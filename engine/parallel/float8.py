"""FP8 matmuls for training, applied from outside the model like the other parallelisms:
torchao's float8 training swaps the linear layers of the blocks (but the first and last
`bf16_blocks`) for Float8Linear, which casts input, weight and output gradient to float8 with
dynamic scales (per tensor or per row) and multiplies with torch._scaled_mm. The parameters
keep their names and dtypes: checkpoints, FSDP and the optimizer see no difference. On a GPU
without float8 matmuls (before Hopper/Ada) or on the CPU, torchao emulates them in high
precision with the same casts (the tests run that way)."""

from __future__ import annotations

import dataclasses
import importlib.util

import torch
from torch import nn

from engine.errors import SpecError
from engine.parallel.layout import float8_blocks


def apply_float8(model: nn.Module, recipe: str, bf16_blocks: int, device: torch.device) -> None:
    """Convert the linear layers of the model's blocks in place (on the meta device, before
    materialisation), but the first and last `bf16_blocks`; their SwiGLU then runs gate and up
    as two float8 GEMMs. `recipe`: torchao's tensorwise or rowwise scaling."""
    if importlib.util.find_spec("torchao") is None:
        raise SpecError("float8 needs the torchao package (pip install torchao) on the nodes")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if not _has_float8_matmul(device):
        config = dataclasses.replace(config, emulate=True)
    converted = float8_blocks(model.cfg.num_layers, bf16_blocks)
    for name, block in model.layers.items():  # named by their index in the whole model
        if int(name) in converted:
            convert_to_float8_training(block, config=config)
            block.mlp.stacked_gemm = False


def _has_float8_matmul(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
