"""The Llama-family decoder as a plain nn.Module, shaped for parallelism applied from outside.

- `layers` is an nn.ModuleDict keyed "0", "1", ...: a pipeline stage deletes the blocks it does
  not own and every parameter keeps its name; FSDP2, activation recompute and torch.compile wrap
  one block at a time.
- Built on the meta device, then `to_empty(device=...)` + `init_weights(seed)` (or a load): every
  parameter is drawn on the CPU from a generator seeded by (seed, parameter name), so the weights
  are the same on any device, in any process, however the model is split.
- The forward has no host synchronisation.

Parameter names: `embed.weight`, `layers.{i}.attn_norm.weight`, `layers.{i}.attn.{wq,wk,wv}.weight`
(+ `.bias` for Qwen2), `layers.{i}.attn.wo.weight`, `layers.{i}.mlp_norm.weight`,
`layers.{i}.mlp.{w_gate,w_up,w_down}.weight`, `norm.weight`, and `lm_head.weight` unless tied.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from engine.model.attention import Attention
from engine.model.config import ModelConfig
from engine.model.fused_loss import linear_cross_entropy
from engine.model.kd_loss import TeacherTarget, linear_distillation_loss
from engine.model.rope import rope_cos_sin

# Segments that wrappers (torch.compile, activation checkpointing) insert into parameter names.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back before the weight (as HF Llama); the
    weight multiplies in the input's dtype, so under autocast the output stays bf16 as with
    bf16 weights."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """w_down(silu(w_gate x) * w_up x), gate and up computed as one GEMM over their stacked
    weights. The parameters stay separate, so names, checkpoints, HF conversion and sharding are
    unchanged; once compiled, stacking the weights and autocast's cast of them are one kernel.

    The stacked weight interleaves blocks of 64 gate rows with 64 up rows, so each gate column
    lies next to its up column: the backward then writes both gradients from one pass over
    gate, up and the output gradient. Stacked as [gate; up], inductor's kernel for that
    backward ran at half the memory bandwidth (9.7 ms of a 244 ms step on the 1.1B shape); with
    blocks of 64 the step is 1.8% faster (docs/benchmarks.md)."""

    BLOCK = 64

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w_up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        # set from outside while the weights cannot change (decoding, engine/generate/): a
        # decode step then reads the stacked weight instead of stacking it again
        self.stacked: torch.Tensor | None = None
        # off once w_gate and w_up are float8 linears (engine/parallel/float8.py): each GEMM
        # then goes through its module
        self.stacked_gemm = True

    def stacked_weight(self) -> torch.Tensor:
        gate, up = local_shard(self.w_gate.weight), local_shard(self.w_up.weight)
        rows, hidden = gate.shape  # rows: this rank's FFN width under tensor parallelism
        block = math.gcd(rows, self.BLOCK)
        return torch.stack((gate.view(rows // block, block, hidden),
                            up.view(rows // block, block, hidden)), dim=1).flatten(0, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.stacked_gemm:
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        stacked = self.stacked if self.stacked is not None else self.stacked_weight()
        rows = stacked.shape[0] // 2
        block = math.gcd(rows, self.BLOCK)
        both = F.linear(x, stacked).unflatten(-1, (rows // block, 2, block))
        return self.w_down((F.silu(both[..., 0, :]) * both[..., 1, :]).flatten(-2))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LlamaModel(nn.Module):
    """Token ids [batch, seq] -> logits [batch, seq, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied: no second module holding the embedding, so to_empty / FSDP cannot untie it.
        self.lm_head = (None if cfg.tie_word_embeddings
                        else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))

    def forward_hidden(self, input_ids: torch.Tensor,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states [batch, seq, hidden], for losses that fuse the head.

        A pipeline stage (engine/parallel/pipeline.py) is this model with parts set to None:
        without `embed` the input is the previous stage's hidden states, without `norm` the
        output is the residual stream as the next stage takes it."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        h = input_ids if self.embed is None else self.embed(input_ids)
        device = h.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16:
            h = h.to(torch.bfloat16)  # a bf16 residual stream, as Megatron's bf16 (fp16 keeps fp32)
        cos, sin = rope_cos_sin(self.cfg, position_ids, h.dtype)
        for block in self.layers.values():
            h = block(h, cos, sin)
        return h if self.norm is None else self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.embed.weight)
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None,
                teacher: TeacherTarget | None = None, return_hidden: bool = False):
        """Logits; or, given `targets` (and a `loss_mask`), the sum of the masked token losses as
        an fp32 scalar, through the chunked head + cross-entropy that never materialises the
        logits (engine/model/fused_loss.py); or, given a `teacher` too, the distillation loss
        sum and its [CE, KD] parts (engine/model/kd_loss.py); or with `return_hidden` the
        final-normed hidden states (a teacher's, for that loss). Going through forward keeps
        DDP/FSDP hooks intact."""
        hidden = self.forward_hidden(input_ids, position_ids)
        if return_hidden:
            return hidden
        if targets is None:
            return self.logits(hidden)
        mask = torch.ones_like(targets, dtype=torch.bool) if loss_mask is None else loss_mask
        if teacher is not None:
            return linear_distillation_loss(hidden, self.head_weight(), teacher, targets, mask,
                                            compute_dtype=_compute_dtype(hidden))
        return self.head_loss(hidden, targets, mask)

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def head_loss(self, hidden: torch.Tensor, targets: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """The sum of the masked token losses of the final-normed `hidden`, head and
        cross-entropy fused; also the pipeline's last-stage loss, so both compute the same."""
        return linear_cross_entropy(hidden, self.head_weight(), targets, mask,
                                    compute_dtype=_compute_dtype(hidden))

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Norms 1, biases 0, other weights N(0, init_std); the residual-branch outputs (wo,
        w_down) N(0, init_std / sqrt(2 * num_layers)) so the residual stream's variance does not
        grow with depth (Megatron-LM's scaled init)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for raw_name, param in self.named_parameters():
            if param.is_meta:
                raise RuntimeError("parameters are on the meta device: call "
                                   "model.to_empty(device=...) before init_weights")
            name = canonical_name(raw_name)
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                scale = out_std if name.endswith(("attn.wo.weight", "mlp.w_down.weight")) else std
                full = _seeded_normal(param.shape, scale, seed, name).to(param.device)
                if isinstance(param, DTensor):  # a sharded parameter takes its own slice
                    full = distribute_tensor(full, param.device_mesh, param.placements,
                                             src_data_rank=None)
                param.copy_(full)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The head's matmul dtype: autocast's if on, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def local_shard(weight: torch.Tensor) -> torch.Tensor:
    """This rank's part of a weight that tensor parallelism sharded (a DTensor), for code that
    computes with the raw weight; the weight itself otherwise."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def canonical_name(name: str) -> str:
    """A parameter's name without the segments that wrappers insert."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _seeded_normal(shape: torch.Size, std: float, seed: int, name: str) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.empty(shape).normal_(0.0, std, generator=generator)
