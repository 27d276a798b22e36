"""FP8 matmuls (engine/parallel/float8.py, spec section `float8`), in torchao's emulation on the
CPU: the same casts to float8 and scales as on an H100, computed in high precision."""

from __future__ import annotations

import pytest
import torch
from conftest import logged_losses
from torch import nn
from torchao.float8.float8_linear import Float8Linear

from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.parallel.float8 import apply_float8
from engine.train.loop import train
from engine.train.spec import PretrainSpec

CFG = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_inner_blocks_compute_in_float8(recipe):
    plain = LlamaModel(CFG)
    plain.init_weights(seed=0)
    fp8 = LlamaModel(CFG)
    fp8.load_state_dict(plain.state_dict())
    apply_float8(fp8, recipe, 1, torch.device("cpu"))
    kinds = {name: type(block.mlp.w_down).__name__ for name, block in fp8.layers.items()}
    assert kinds == {"0": "Linear", "1": "Float8Linear", "2": "Float8Linear", "3": "Linear"}
    assert all(isinstance(m, Float8Linear) for m in fp8.layers["1"].modules()
               if isinstance(m, nn.Linear))
    assert [b.mlp.stacked_gemm for b in fp8.layers.values()] == [True, False, False, True]
    assert fp8.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(0, CFG.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = plain(tokens), fp8(tokens)
    error = ((got - want).norm() / want.norm()).item()
    assert 1e-4 < error < 0.05, error  # rounded to float8 (e4m3: 3 mantissa bits), not broken


def test_float8_pretrain_follows_bf16(tiny_dataset, tmp_path):
    """20 steps with float8 matmuls track the same run without them, and the checkpoint is a
    plain one."""
    def run(name: str, float8: dict | None) -> dict[int, float]:
        spec = PretrainSpec.model_validate({
            "model": CFG.model_dump(), "data": {"blend": [tiny_dataset], "seq_length": 32},
            "checkpoint": {"save": str(tmp_path / name)}, "iters": 20, "global_batch_size": 8,
            "micro_batch_size": 8, "precision": "bf16", "float8": float8, "device": "cpu",
            "log_interval": 1, "optim": {"lr": 3e-3, "warmup_iters": 2}})
        train(spec, "pretrain")
        return logged_losses(tmp_path / name)

    bf16 = run("bf16", None)
    fp8 = run("fp8", {"recipe": "rowwise"})
    assert fp8[20] < fp8[1] - 1.0
    assert max(abs(fp8[i] - bf16[i]) / bf16[i] for i in bf16) < 0.02
    assert bf16 != fp8


def test_float8_spec_checks():
    base = {"model": CFG.model_dump(), "data": {"blend": ["d"], "seq_length": 32},
            "checkpoint": {"save": "s"}, "iters": 1, "global_batch_size": 2, "float8": {}}
    with pytest.raises(ValueError, match="float8 with tensor_parallel is not supported yet"):
        PretrainSpec.model_validate({**base, "tensor_parallel": 2, "precision": "bf16"})
    with pytest.raises(ValueError, match="float8 computes over bf16 .* not fp32"):
        PretrainSpec.model_validate({**base, "precision": "fp32"})
