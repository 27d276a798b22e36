"""Where a training step's GPU time goes: torch.profiler over a few steps of bench.train_step's
model, kernels grouped by class (GEMM, attention forward/backward, compiled fused kernels, eager
elementwise, copies/casts, optimizer), the top kernels and operators, each GEMM shape's rate
inside the step, and the idle time between kernels summed by the kernels on either side.

    python -m bench.profile_step --numerics autocast --compile block --seq 4096 --micro-batch 4 \
        --attention flash_attn_4

`--kernels` also times the attention backends (SDPA's, and FlashAttention-4 when installed, each
checked against fp32 attention) and the step's GEMM shapes alone (TFLOP/s), to say how far each
class is from what the card can do.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from bench.train_step import (ATTENTION, SHAPES, add_reductions_argument, build, gemm_rate, mean_time,
                              numerics_context, train_step)
from engine.model.config import ModelConfig
from engine.train.loop import set_split_k_reductions

# Kernel-name substrings per class, checked in order.
CLASSES = [
    ("attention backward", ("flash_bwd", "fmha_bwd", "bprop", "dot_do_o", "convert_dq",
                            "attention_backward", "bwd_kernel", "dq_dk_dv")),
    ("attention forward", ("flash_fwd", "fmha", "cudnn", "attention", "fwd_kernel")),
    ("GEMM", ("gemm", "nvjet", "sm90_xmma", "cutlass", "xmma", "cublas", "splitk")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("compiled (triton)", ("triton",)),
    ("copy / cast", ("copy", "memcpy", "memset", "fill")),  # dtype casts run direct_copy_kernel
    ("eager elementwise / reduce", ("elementwise", "reduce", "vectorized", "softmax", "index", "scatter", "gather")),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile(args, device) -> None:
    cfg = ModelConfig(**SHAPES[args.shape], max_position_embeddings=max(args.seq, 4096))
    torch.manual_seed(0)
    model, opt, loss_fn = build("ours", cfg, args.numerics, args.compile, "fused", device, args.attention)
    tokens = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), device=device)
    ctx = numerics_context(args.numerics)

    for _ in range(args.warmup):
        train_step(loss_fn, opt, tokens, ctx)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       record_shapes=True) as prof:
        t = time.perf_counter()
        for _ in range(args.steps):
            train_step(loss_fn, opt, tokens, ctx)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / args.steps
    with tempfile.TemporaryDirectory() as tmp:
        trace = args.trace or os.path.join(tmp, "steps.json")
        prof.export_chrome_trace(trace)
        spans = gpu_spans(trace)
    busy = collections.Counter()
    count = collections.Counter()
    per_kernel = collections.Counter()
    for start, stop, name in spans:
        busy[kernel_class(name)] += stop - start
        count[kernel_class(name)] += 1
        per_kernel[name] += stop - start
    running = busy_time(spans) / args.steps / 1e3
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {args.shape} | seq {args.seq} | "
          f"micro-batch {args.micro_batch} | {args.numerics} | compile {args.compile} | "
          f"attention {args.attention} | "
          f"bf16 reductions {args.bf16_reductions}")
    print(f"step {wall * 1e3:.1f} ms wall, some kernel running {running:.1f} ms "
          f"({running / (wall * 1e3):.1%}); {args.micro_batch * args.seq / wall:,.0f} tokens/s\n")
    print("| class | ms / step | share of step | kernels / step |")
    print("|---|---:|---:|---:|")
    for cls, us in busy.most_common():
        ms = us / args.steps / 1e3
        print(f"| {cls} | {ms:.1f} | {ms / (wall * 1e3):.1%} | {count[cls] // args.steps} |")
    idle = wall * 1e3 - running
    print(f"| idle (no kernel running) | {idle:.1f} | {idle / (wall * 1e3):.1%} | |")
    print_idle(spans, wall * 1e3, args.steps, args.top)
    print("\ntop kernels:\n")
    print("| kernel | class | ms / step |")
    print("|---|---|---:|")
    for name, us in per_kernel.most_common(args.top):
        print(f"| {name[:90]} | {kernel_class(name)} | {us / args.steps / 1e3:.2f} |")
    print_ops(prof, args.steps, args.top)
    print_gemms(prof, args.steps, device)
    if args.trace:
        print(f"\ntrace: {args.trace}")


def gpu_spans(trace: str) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of everything the GPU ran (kernels, memsets, copies), sorted, from
    a Chrome trace written by torch.profiler: the timeline one opens in Perfetto, so the tables
    and the picture agree. Annotation ranges ("## Call CompiledFxGraph ...", the optimizer's
    step) have categories of their own and are not counted; kernel names may contain '#'."""
    opener = gzip.open if trace.endswith(".gz") else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    return sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                  if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and e.get("dur", 0) > 0)


def busy_time(spans: list[tuple[float, float, str]]) -> float:
    """µs during which at least one of the sorted spans runs (overlapping kernels count once)."""
    total, end = 0.0, float("-inf")
    for start, stop, _ in spans:
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def print_idle(spans, wall_ms: float, steps: int, top: int) -> None:
    """Where the GPU waits: the gaps between kernels, summed by the kernels on either side (the
    host work in between is what to shorten), and the time outside the first and last kernel."""
    gaps, count = collections.Counter(), collections.Counter()
    end, before = spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            key = (before[:60], name[:60])
            gaps[key] += start - end
            count[key] += 1
        if stop > end:
            end, before = stop, name
    edges = wall_ms - (end - spans[0][0]) / 1e3 / steps
    print(f"\nidle between kernels, by the kernels on either side (outside the first and last "
          f"kernel: {edges:.2f} ms / step):\n")
    print("| after | before | ms / step | gaps / step |")
    print("|---|---|---:|---:|")
    for (after, nxt), us in gaps.most_common(top):
        print(f"| {after} | {nxt} | {us / steps / 1e3:.2f} | {count[(after, nxt)] / steps:g} |")


def print_ops(prof, steps: int, top: int) -> None:
    """The operators that launched the kernels (self device time), e.g. which aten::copy_."""
    rows = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                  key=lambda e: e.self_device_time_total, reverse=True)
    print("\ntop operators (their own kernels' time):\n")
    print("| operator | ms / step | calls / step |")
    print("|---|---:|---:|")
    for e in rows[:top]:
        if e.self_device_time_total <= 0:
            break
        print(f"| {e.key[:80]} | {e.self_device_time_total / steps / 1e3:.2f} | {e.count // steps} |")


def print_gemms(prof, steps: int, device) -> None:
    """Each GEMM shape's rate inside the step, and the same shape alone (row-major operands,
    back to back): a shape slower in the step than alone loses time to its neighbours (clocks,
    caches), not to cuBLAS's choice of kernel."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key != "aten::mm" or e.self_device_time_total <= 0 or len(e.input_shapes) < 2:
            continue
        (m, k), (_, n) = e.input_shapes[0], e.input_shapes[1]
        rows.append((e.self_device_time_total / steps / 1e3, m, k, n, e.count // steps,
                     2 * m * k * n * e.count / e.self_device_time_total / 1e6))
    print("\nGEMMs by shape ([M, K] x [K, N]), in the step and alone:\n")
    print("| M | K | N | calls / step | ms / step | TFLOP/s in step | TFLOP/s alone |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for ms, m, k, n, calls, tflops in sorted(rows, reverse=True):
        print(f"| {m} | {k} | {n} | {calls} | {ms:.2f} | {tflops:.0f} | {gemm_rate(m, k, n, device):.0f} |")


def _attention_candidates(h: int, kv: int):
    """(name, causal attention on [batch, seq, heads, head_dim] tensors, as the model calls it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend, gqa):
        def run(q, k, v):
            if not gqa:
                k, v = k.repeat_interleave(h // kv, 2), v.repeat_interleave(h // kv, 2)
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2), is_causal=True,
                                                      enable_gqa=gqa).transpose(1, 2)
        return run

    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for gqa in (True, False):
            yield f"sdpa {name}, {'enable_gqa' if gqa else 'KV heads expanded'}", sdpa(backend, gqa)
    try:
        from engine.model.flash_attention_4 import flash_attention_4
    except ImportError:
        return
    yield "flash_attn_4 (the engine's custom op)", flash_attention_4


def kernels(args, device) -> None:
    """Attention backends and the step's GEMMs, alone. Each attention backend's output and
    gradients are compared with fp32 attention on the same bf16 inputs."""
    s = SHAPES[args.shape]
    b, n, h, kv = args.micro_batch, args.seq, s["num_heads"], s["num_kv_heads"]
    d = s["hidden_size"] // h
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(b, n, heads, d, device=device, dtype=torch.bfloat16, generator=gen)
               .requires_grad_() for heads in (h, kv, kv))
    dout = torch.randn(b, n, h, d, device=device, dtype=torch.bfloat16, generator=gen)
    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in exact), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, exact, dout.float())
    flops_fwd = 4 * b * h * n * n * d / 2  # causal: half the score matrix
    print(f"\nattention alone: [{b}, {n}, {h} heads ({kv} KV), {d}] bf16, causal; error = max |x − fp32 "
          "attention| for the output and dq, dk, dv\n")
    print("| backend | forward TFLOP/s | forward+backward TFLOP/s | error out | dq | dk | dv |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, attention in _attention_candidates(h, kv):
        def fwd_bwd():
            return torch.autograd.grad(attention(q, k, v), (q, k, v), dout)

        try:
            out = attention(q, k, v)
            errors = [(x.float() - r).abs().max().item()
                      for x, r in zip((out, *fwd_bwd()), (ref, *ref_grads))]
            tf = flops_fwd / mean_time(lambda: attention(q, k, v)) / 1e12
            tfb = 3.5 * flops_fwd / mean_time(fwd_bwd) / 1e12  # backward = 2.5x forward
        except RuntimeError as exc:
            print(f"| {name} | n/a ({str(exc).splitlines()[0][:60]}) | | | | | |")
            continue
        print(f"| {name} | {tf:.0f} | {tfb:.0f} | " + " | ".join(f"{e:.2e}" for e in errors) + " |")
    tokens = b * n
    hid, ffn, vocab = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    kvd = kv * d
    print(f"\nGEMMs alone ({tokens} tokens, bf16): [M, K] x [K, N]\n")
    print("| GEMM | M | K | N | TFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for label, m_, k_, n_ in (("q / o", tokens, hid, hid), ("k or v", tokens, hid, kvd),
                              ("qkv fused", tokens, hid, hid + 2 * kvd), ("gate or up", tokens, hid, ffn),
                              ("gate+up fused", tokens, hid, 2 * ffn), ("down", tokens, ffn, hid),
                              ("lm head chunk", 4096, hid, vocab), ("8192 cube", 8192, 8192, 8192)):
        print(f"| {label} | {m_} | {k_} | {n_} | {gemm_rate(m_, k_, n_, device):.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="tinyllama-1.1b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--numerics", default="autocast", choices=["autocast", "master", "bf16"])
    p.add_argument("--compile", default="block", choices=["off", "block", "model"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--attention", default="sdpa", choices=ATTENTION)
    p.add_argument("--kernels", action="store_true", help="also time attention backends and GEMMs alone")
    p.add_argument("--trace", default=None,
                   help="also write the profiled steps as a Chrome/Perfetto trace (.json or .json.gz): "
                        "the host's timeline shows what it was doing in each idle gap")
    add_reductions_argument(p)
    args = p.parse_args()
    device = torch.device("cuda")
    set_split_k_reductions(low_precision=args.bf16_reductions == "on")
    profile(args, device)
    if args.kernels:
        kernels(args, device)


if __name__ == "__main__":
    main()
