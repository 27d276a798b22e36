"""How much each prunable unit matters: hidden channels, query heads, FFN neurons, layers.

One pass over the calibration data, through forward hooks on the plain model, measures what
every method needs (Minitron, arXiv 2407.14679): each norm's output per hidden channel, each
head's attention output (before `wo`), each neuron's activation (`w_down`'s input), each block's
input and output, each norm's input energy (for rescaling the norms after pruning) and the
loss. Per sequence the mean over positions, across sequences the L2 norm (Minitron's best
aggregation). `magnitude` reads weight norms instead, `random` draws (the Cookbook's).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from engine.model.llama import LlamaModel


@dataclass
class Width:
    """Importance of the width units: hidden [H], heads [L, num_heads], neurons [L, FFN]."""

    hidden: torch.Tensor
    heads: torch.Tensor
    neurons: torch.Tensor


@dataclass
class Measured:
    """What one pass over the calibration data saw."""

    width: Width              # the `activation` scores
    energy: torch.Tensor      # [2L + 1, H]: mean x_c² at each norm's input (attn, mlp, ..., final)
    blocks: torch.Tensor      # [L]: mean 1 − cos(block input, block output) over positions
    loss: float               # mean next-token loss of the whole model


def norms(model: LlamaModel) -> list[nn.Module]:
    """The model's RMSNorms in order: layer i's attn_norm (2i) and mlp_norm (2i + 1), the
    final norm last."""
    found = [n for block in model.layers.values() for n in (block.attn_norm, block.mlp_norm)]
    return found + [model.norm]


@torch.no_grad()
def measure(model: LlamaModel, tokens: torch.Tensor, batch_size: int,
            progress: bool = False) -> Measured:
    cfg, device = model.cfg, next(model.parameters()).device
    hidden = torch.zeros(2 * cfg.num_layers + 1, cfg.hidden_size, device=device)
    energy = torch.zeros_like(hidden)
    heads = torch.zeros(cfg.num_layers, cfg.num_heads, device=device)
    neurons = torch.zeros(cfg.num_layers, cfg.intermediate_size, device=device)
    blocks = torch.zeros(cfg.num_layers, device=device)

    def on_norm(k: int):
        def hook(_module, args, out):
            energy[k] += args[0].float().pow(2).sum((0, 1))
            hidden[k] += out.float().abs().mean(1).pow(2).sum(0)
        return hook

    def on_heads(i: int):
        def hook(_module, args):
            x = args[0].float()
            per_head = x.view(*x.shape[:2], cfg.num_heads, -1).norm(dim=-1)
            heads[i] += per_head.mean(1).pow(2).sum(0)
        return hook

    def on_neurons(i: int):
        def hook(_module, args):
            neurons[i] += args[0].float().abs().mean(1).pow(2).sum(0)
        return hook

    def on_block(i: int):
        def hook(_module, args, out):
            cos = torch.cosine_similarity(args[0].float(), out.float(), dim=-1)
            blocks[i] += (1 - cos).sum()
        return hook

    hooks = [n.register_forward_hook(on_norm(k)) for k, n in enumerate(norms(model))]
    for i, block in enumerate(model.layers.values()):
        hooks += [block.attn.wo.register_forward_pre_hook(on_heads(i)),
                  block.mlp.w_down.register_forward_pre_hook(on_neurons(i)),
                  block.register_forward_hook(on_block(i))]
    try:
        loss = calibration_loss(model, tokens, batch_size, progress)
    finally:
        for hook in hooks:
            hook.remove()
    positions = tokens.shape[0] * (tokens.shape[1] - 1)
    width = Width(hidden.sqrt().sum(0).cpu(), heads.sqrt().cpu(), neurons.sqrt().cpu())
    return Measured(width, (energy / positions).cpu(), (blocks / positions).cpu(), loss)


@torch.no_grad()
def calibration_loss(model: LlamaModel, tokens: torch.Tensor, batch_size: int,
                     progress: bool = False) -> float:
    """Mean next-token cross-entropy over the calibration sequences (bf16 compute on a GPU)."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    batches = tqdm(tokens.split(batch_size), desc="calibration", unit="batch", mininterval=1.0,
                   disable=not progress)
    with _autocast(device):
        for batch in batches:
            batch = batch.to(device)
            total += model(batch[:, :-1], targets=batch[:, 1:]).double()
    return float(total) / (tokens.shape[0] * (tokens.shape[1] - 1))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Skip(nn.Module):
    """A removed block: the residual stream passes through."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def removal_losses(model: LlamaModel, tokens: torch.Tensor, batch_size: int,
                   count: int) -> tuple[list[int], torch.Tensor]:
    """Depth by perplexity, greedily: `count` times, the calibration loss with each remaining
    layer removed, and the one whose removal costs least goes before the next step (one-shot
    scores miss that two neighbours can each be cheap to lose but not both). The layers removed
    in order, and the losses [count, L] (NaN for layers already gone)."""
    names = list(model.layers.keys())
    originals = dict(model.layers.items())
    losses = torch.full((count, len(names)), float("nan"), dtype=torch.float64)
    removed: list[int] = []
    try:
        for step in range(count):
            for i, name in enumerate(names):
                if i in removed:
                    continue
                model.layers[name] = _Skip()
                losses[step, i] = calibration_loss(model, tokens, batch_size)
                model.layers[name] = originals[name]
            removed.append(int(losses[step].nan_to_num(float("inf")).argmin()))
            model.layers[names[removed[-1]]] = _Skip()
    finally:
        for name, block in originals.items():
            model.layers[name] = block
    return removed, losses


@torch.no_grad()
def magnitude_scores(model: LlamaModel) -> Width:
    """L2 norms of the weights each unit owns: a hidden channel's column (or row) in every
    matrix and its norm weights; a head's rows of wq and columns of wo; a neuron's rows of
    w_gate and w_up and column of w_down."""
    cfg = model.cfg
    hidden = model.embed.weight.float().pow(2).sum(0)
    if model.lm_head is not None:
        hidden += model.lm_head.weight.float().pow(2).sum(0)
    hidden += model.norm.weight.float().pow(2)
    heads, neurons = [], []
    for block in model.layers.values():
        attn, mlp = block.attn, block.mlp
        for reads in (attn.wq, attn.wk, attn.wv, mlp.w_gate, mlp.w_up):
            hidden += reads.weight.float().pow(2).sum(0)
        for writes in (attn.wo, mlp.w_down):
            hidden += writes.weight.float().pow(2).sum(1)
        hidden += block.attn_norm.weight.float().pow(2) + block.mlp_norm.weight.float().pow(2)
        q = attn.wq.weight.float().pow(2).view(cfg.num_heads, -1).sum(1)
        o = attn.wo.weight.float().pow(2).view(cfg.hidden_size, cfg.num_heads, -1).sum((0, 2))
        heads.append(q + o)
        neurons.append(mlp.w_gate.weight.float().pow(2).sum(1)
                       + mlp.w_up.weight.float().pow(2).sum(1)
                       + mlp.w_down.weight.float().pow(2).sum(0))
    return Width(hidden.sqrt().cpu(), torch.stack(heads).sqrt().cpu(),
                 torch.stack(neurons).sqrt().cpu())


def random_scores(model: LlamaModel, seed: int) -> Width:
    """Uniform draws: one ranking of hidden channels for the whole model, and of heads and
    neurons per layer (the Cookbook's random masks)."""
    cfg, gen = model.cfg, torch.Generator().manual_seed(seed)
    return Width(torch.rand(cfg.hidden_size, generator=gen),
                 torch.rand(cfg.num_layers, cfg.num_heads, generator=gen),
                 torch.rand(cfg.num_layers, cfg.intermediate_size, generator=gen))
