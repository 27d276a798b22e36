"""The distillation loss on a GPU: eager vs compiled chunk arithmetic (their difference, to
decide whether to compile by default as the fused cross-entropy does), and their time and peak
memory against the fused cross-entropy alone.

    python -m bench.kd_loss --tokens 32768 --hidden 2048 --teacher-hidden 4096 --vocab 32000
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.model.fused_loss import linear_cross_entropy
from engine.model.kd_loss import TeacherTarget, linear_distillation_loss


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(ms per call, peak GiB above the inputs) of fn() forward and backward."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return ((time.perf_counter() - start) / repeats * 1e3,
            (torch.cuda.max_memory_allocated() - base) / 2**30)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--teacher-hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    h = (torch.randn(args.tokens, args.hidden, device=dev) * 0.5).to(bf16).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, device=dev) * 0.02).requires_grad_()
    th = (torch.randn(args.tokens, args.teacher_hidden, device=dev) * 0.5).to(bf16)
    tw = (torch.randn(args.vocab, args.teacher_hidden, device=dev) * 0.02).to(bf16)
    t = torch.randint(0, args.vocab, (args.tokens,), device=dev)
    m = torch.ones(args.tokens, dtype=torch.bool, device=dev)
    print(torch.cuda.get_device_name(), vars(args))

    def run_ce():
        h.grad = w.grad = None
        linear_cross_entropy(h, w, t, m, compute_dtype=bf16).backward()

    ms, gib = _timed(run_ce, args.repeats)
    print(f"fused CE: {ms:.1f} ms fwd+bwd, peak +{gib:.2f} GiB")
    for top_k in (None, 64):
        results = {}
        for compiled in (False, True):
            def run_kd():
                h.grad = w.grad = None
                loss, parts = linear_distillation_loss(
                    h, w, TeacherTarget(th, tw, 0.5, 2.0, top_k), t, m, compute_dtype=bf16,
                    compiled=compiled)
                loss.backward()
                results[compiled] = (parts, h.grad.float(), w.grad.float())

            ms, gib = _timed(run_kd, args.repeats)
            print(f"KD top_k={top_k} compiled={compiled}: {ms:.1f} ms fwd+bwd, peak +{gib:.2f} GiB")
        (pe, he, we), (pc, hc, wc) = results[False], results[True]
        print(f"  compiled vs eager: parts {pe.tolist()} vs {pc.tolist()}, max rel diff "
              f"{((pe - pc).abs() / pe.abs()).max().item():.2e}; grad_h "
              f"{((he - hc).abs().max() / he.abs().max()).item():.2e}, grad_w "
              f"{((we - wc).abs().max() / we.abs().max()).item():.2e} (of max)")


if __name__ == "__main__":
    main()
