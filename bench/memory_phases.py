"""Where a training step's memory goes, phase by phase, under each numerics mode: allocated
memory at the step's start, the peak and end of the forward, of the backward and of the
optimizer step (torch.cuda's allocator counters, reset between phases), three steps each.

    python -m bench.memory_phases --attention sdpa

The 1.1B shape, seq 4096, micro-batch 4, compiled blocks, the engine's fused loss; the models
are bench.train_step's (same initial weights, same optimizers).
"""

from __future__ import annotations

import argparse
import gc

import torch

from bench.train_step import ATTENTION, SHAPES, build, numerics_context
from engine.model.config import ModelConfig

GIB = 2 ** 30


def _phase(fn) -> tuple[float, float]:
    """Run `fn` on the GPU; its peak allocated memory and what stays allocated after it, GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB, torch.cuda.memory_allocated() / GIB


def measure(cfg: ModelConfig, numerics: str, args) -> list[str]:
    """The table rows of `args.steps` steps of one numerics mode (its model freed on return)."""
    torch.manual_seed(0)
    model, opt, loss_fn = build("ours", cfg, numerics, "block", "fused", "cuda", args.attention)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), device="cuda")
    ctx = numerics_context(numerics)
    loss: list[torch.Tensor] = []

    def forward() -> None:
        with ctx:
            loss.append(loss_fn(tokens))

    rows = []
    for step in range(args.steps):
        start = torch.cuda.memory_allocated() / GIB
        fwd = _phase(forward)
        bwd = _phase(lambda: loss.pop().backward())
        opt_peak, _ = _phase(opt.step)
        opt.zero_grad(set_to_none=True)
        rows.append(f"| {numerics} | {step} | {start:.2f} | {fwd[0]:.2f} | {fwd[1]:.2f} | {bwd[0]:.2f} "
                    f"| {bwd[1]:.2f} | {opt_peak:.2f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="tinyllama-1.1b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--attention", default="sdpa", choices=ATTENTION)
    p.add_argument("--numerics", nargs="+", default=["master", "autocast"],
                   choices=["master", "autocast", "bf16"])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    cfg = ModelConfig(**SHAPES[args.shape], max_position_embeddings=args.seq)
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {args.shape} | seq {args.seq} "
          f"| micro-batch {args.micro_batch} | attention {args.attention} | GiB allocated")
    print("| numerics | step | at start | forward peak | after forward | backward peak "
          "| after backward | optimizer peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for numerics in args.numerics:
        for row in measure(cfg, numerics, args):
            print(row, flush=True)
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
