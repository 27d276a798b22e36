"""Small levers on the training step, alternated in one process so that the
machine's drift (its power cap, its temperature) falls on all of them alike.

    python -m bench.step_levers --attention flash_attn_4 --rounds 3

Variants of the 1.1B step (autocast unless said, compiled blocks, the engine's fused loss); the
summary compares each with the first one given:
- `synced`: the GPU idle at both ends of each step (bench.train_step's timing before it
  switched to the next one);
- `back-to-back`: no synchronisation between steps, each step timed by CUDA events
  (bench.train_step's timing now);
- `bf16-reductions`: cuBLAS allowed to reduce split-K partial sums in bf16;
- `chunk-16384`: the fused loss over chunks of 16,384 rows instead of 4,096 (one chunk here);
- `master-weights`: bf16 weights with fp32 masters in the optimizer instead of autocast over fp32
  weights (engine/train/master_adamw.py; a second model, from the same initial weights);
- `pure-bf16`: bf16 weights and optimizer state (a third model), the bound for the one above;
  these four are timed back to back.
Each row gives tokens/s, MFU and the SM clock and power it ran at (bench/clocks.py).
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch

from bench.clocks import ClockSampler, ClockSummary
from bench.train_step import (ATTENTION, SHAPES, back_to_back, build, clock_columns, gemm_ceiling,
                              numerics_context, timed_step)
from engine.model.config import ModelConfig
from engine.model import fused_loss, llama
from engine.train.flops import flops_per_token, peak_flops
from engine.train.loop import set_split_k_reductions

VARIANTS = ("synced", "back-to-back", "bf16-reductions", "chunk-16384", "master-weights", "pure-bf16")
NUMERICS = {"master-weights": "master", "pure-bf16": "bf16"}  # other variants: autocast


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attention", default="sdpa", choices=ATTENTION)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = p.parse_args()
    device = torch.device("cuda")
    cfg = ModelConfig(**SHAPES["tinyllama-1.1b"], max_position_embeddings=max(args.seq, 4096))
    torch.manual_seed(0)
    steps = {numerics: build("ours", cfg, numerics, "block", "fused", device, args.attention)[1:]
             for numerics in {NUMERICS.get(v, "autocast") for v in args.variants}}
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), device=device)
    per_token = flops_per_token(cfg, args.seq)
    peak = peak_flops(device)

    def run(variant: str) -> tuple[float, ClockSummary | None]:
        """Median seconds a step, and the clocks of the timed steps."""
        set_split_k_reductions(low_precision=variant == "bf16-reductions")
        rows = 16384 if variant == "chunk-16384" else 4096
        llama.linear_cross_entropy = functools.partial(fused_loss.linear_cross_entropy, chunk_rows=rows)
        numerics = NUMERICS.get(variant, "autocast")
        opt, loss_fn = steps[numerics]
        ctx = numerics_context(numerics)
        for _ in range(3):  # warm-up (and the chunk shape's compilation)
            timed_step(loss_fn, opt, tokens, ctx)
        with ClockSampler(torch.cuda.current_device()) as clocks:
            if variant == "synced":
                times = [timed_step(loss_fn, opt, tokens, ctx)[0] for _ in range(args.steps)]
            else:
                times = back_to_back(loss_fn, opt, tokens, ctx, args.steps)[0]
        return statistics.median(times), clocks.summary

    print(f"# {torch.cuda.get_device_name()} (bf16 8192³ matmul {gemm_ceiling(device):.0f} TFLOP/s) | "
          f"torch {torch.__version__} | 1.1B | seq {args.seq} | micro-batch {args.micro_batch} | "
          f"attention {args.attention} | median of {args.steps} steps")
    print("| round | variant | tokens/s | MFU | SM MHz | W (power-capped) |")
    print("|---|---|---:|---:|---:|---:|")
    results: dict[str, list[float]] = {v: [] for v in args.variants}
    try:
        for r in range(args.rounds):
            for variant in args.variants:
                seconds, clocks = run(variant)
                tps = args.micro_batch * args.seq / seconds
                results[variant].append(tps)
                print(f"| {r} | {variant} | {tps:,.0f} | {tps * per_token / peak:.1%} | "
                      f"{clock_columns(clocks)} |", flush=True)
    finally:
        llama.linear_cross_entropy = fused_loss.linear_cross_entropy
        set_split_k_reductions(low_precision=False)
    first = args.variants[0]
    print(f"\n| variant | mean tokens/s | sd | vs {first} |")
    print("|---|---:|---:|---:|")
    base = statistics.fmean(results[first])
    for variant, values in results.items():
        mean = statistics.fmean(values)
        print(f"| {variant} | {mean:,.0f} | {statistics.pstdev(values):,.0f} | {mean / base - 1:+.1%} |")


if __name__ == "__main__":
    main()
