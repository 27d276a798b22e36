"""megatron-core 0.16.1 as an independent reference for the Megatron conversions: its GPTModel
with the local layer spec, built on the CPU in this process (a one-process gloo group).

Four things in megatron-core assume CUDA even on the local spec, each sidestepped here, never
in the engine: the rotary embedding moves its frequencies to `torch.cuda.current_device()` and
torch_dist saving calls it too (-> "cpu"), the save's tensor preload calls
`torch.cuda.synchronize()` (-> no-op), attention dropout forks a CUDA RNG state even at p=0
(-> the fork is a no-op), and the default causal mask is built on "cuda" (-> an explicit mask)."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.model.config import ModelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> None:
    """One-process model parallel state (TP 1, PP 1) and the CPU shims."""
    from megatron.core import parallel_state, tensor_parallel
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


def gpt_model(cfg: ModelConfig, padded_vocab: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    config = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_kv_heads, kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.intermediate_size, normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=cfg.qkv_bias, use_cpu_initialization=True,
        params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False)
    return GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=padded_vocab, max_sequence_length=cfg.max_position_embeddings,
                    position_embedding_type="rope", rotary_base=int(cfg.rope_theta),
                    share_embeddings_and_output_weights=cfg.tie_word_embeddings).eval()


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    seq = ids.shape[1]
    positions = torch.arange(seq)[None].expand_as(ids)
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)  # True: hidden
    return model(ids, positions, attention_mask=mask).float()


def save_dist(model, folder: Path, args) -> None:
    """A torch_dist checkpoint as Megatron-LM writes one (the model, args, version)."""
    from megatron.core import dist_checkpointing
    folder.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "iteration": 7,
                             "checkpoint_version": 3.0}, str(folder))


def load_dist(model, folder: Path) -> None:
    from megatron.core import dist_checkpointing
    with torch.serialization.safe_globals([argparse.Namespace]):  # common.pt's args
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
    model.load_state_dict(state["model"])


def main(work: Path) -> None:
    """In a process of its own (megatron-core's global state stays out of the test session):
    run megatron-core on our exports in `work` and save its logits; save a torch_dist
    checkpoint megatron-core wrote itself, with its logits."""
    from engine.convert.megatron_pickle import load_pickled
    start()
    cfg = ModelConfig.model_validate_json((work / "model_config.json").read_text())
    padded = int((work / "padded_vocab.txt").read_text())
    ids = torch.load(work / "ids.pt")
    ours = gpt_model(cfg, padded)
    state = load_pickled(work / "legacy" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    ours.load_state_dict(state["model"], strict=True)
    torch.save(logits(ours, ids), work / "legacy_logits.pt")
    ours_dist = gpt_model(cfg, padded)
    load_dist(ours_dist, work / "dist" / "release")
    torch.save(logits(ours_dist, ids), work / "dist_logits.pt")
    torch.manual_seed(5)
    own = gpt_model(cfg, padded)
    save_dist(own, work / "mcore" / "iter_0000007", argparse.Namespace(**state["args"].__dict__))
    (work / "mcore" / "latest_checkpointed_iteration.txt").write_text("7")
    torch.save(logits(own, ids), work / "mcore_logits.pt")


if __name__ == "__main__":
    import sys
    main(Path(sys.argv[1]))
