"""bench/yardstick.py computes what the engine's model computes: the benchmarks compare speed
between models that agree."""

from __future__ import annotations

import torch

from bench import yardstick
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel


def test_yardstick_logits_and_loss_equal_the_engines():
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    ours = LlamaModel(cfg)
    ours.init_weights(seed=3)
    plain = yardstick.Llama(cfg)
    plain.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens[:, :-1]), ours(tokens[:, :-1]),
                                   atol=1e-5, rtol=1e-5)
        n = tokens[:, 1:].numel()
        fused = ours(tokens[:, :-1], targets=tokens[:, 1:]) / n
        torch.testing.assert_close(yardstick.loss(plain, tokens), fused, atol=1e-5, rtol=1e-5)
