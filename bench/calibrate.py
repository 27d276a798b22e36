"""The planner's per-GPU rates, measured (engine/plan/gpus.json's fields): a large bf16 GEMM and
its float8 twin, the attention kernel forward and backward (causal, the 1.1B shape's heads), a
copy at memory bandwidth, an all-reduce over the node's GPUs when there are several, the
host's time for an eager block's forward and backward at a tiny size (its op launches; under
each recompute mode, as ratios to none: engine/plan/timing.EAGER_HOST), and for CPU offload the
copies between pinned host memory and the GPU and the optimizer step (clipping, fused AdamW) on
the host's cores. One JSON line to paste into gpus.json (with `source` naming the machine and
the date).

    python -m bench.calibrate                        (GPU; torchrun --nproc-per-node N for links)
    python -m bench.calibrate --host                 (the eager block alone, on this CPU)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.train_step import gemm_ceiling, mean_time
from engine.model.config import ModelConfig
from engine.model.llama import Block
from engine.model.rope import rope_cos_sin
from engine.parallel.recompute import apply_recompute


def attention_tflops(seq: int = 4096, heads: int = 32, dim: int = 64, batch: int = 4) -> float:
    """Forward and backward of causal SDPA: 4·b·heads·s²·d FLOPs forward (half the full
    matrix), 2.5× that with the backward."""
    q, k, v = (torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))

    def step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return 3.5 * 2 * batch * heads * seq * seq * dim / mean_time(step) / 1e12


def fp8_gemm_tflops(n: int = 8192) -> float | None:
    """An e4m3 n³ GEMM with per-tensor scales (torch._scaled_mm, what torchao's tensorwise
    float8 calls); None before Hopper/Ada."""
    if torch.cuda.get_device_capability() < (8, 9):
        return None
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as required
    one = torch.ones((), device="cuda")
    seconds = mean_time(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one,
                                                 out_dtype=torch.bfloat16))
    return 2 * n**3 / seconds / 1e12


def hbm_gbps(gib: int = 4) -> float:
    src = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / mean_time(lambda: dst.copy_(src)) / 1e9


def eager_block_ms(device: torch.device) -> dict[str, float]:
    """A block's eager forward and backward on 8 tokens under each recompute mode: what is left
    is the host launching ops (and, under selective recompute, its policy seeing each op)."""
    cfg = ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=1,
                      num_heads=4, num_kv_heads=4, max_position_embeddings=64)
    x = torch.randn(1, 8, 256, device=device, requires_grad=True)
    cos, sin = rope_cos_sin(cfg, torch.arange(8, device=device)[None], torch.float32)
    times = {}
    for mode in ("none", "full", "selective"):
        holder = torch.nn.Module()
        holder.layers = torch.nn.ModuleDict({"0": Block(cfg).to(device)})
        apply_recompute(holder, mode)
        block = holder.layers["0"]
        times[mode] = 1e3 * mean_time(lambda: block(x, cos, sin).sum().backward(), iters=100)
    return times


def host_link_gbps(gib: int = 1) -> float:
    """Pinned host memory to the GPU and back, the slower direction (FSDP's offload copies)."""
    host = torch.empty(gib << 30, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    seconds = max(mean_time(lambda: gpu.copy_(host, non_blocking=True), iters=5),
                  mean_time(lambda: host.copy_(gpu, non_blocking=True), iters=5))
    return host.numel() / seconds / 1e9


def host_optimizer_gbps(params: int = 1 << 28) -> float:
    """The host's step under CPU offload, on fp32 tensors in host memory: the gradient norm and
    clipping (12 bytes a parameter), then torch's fused AdamW (weights, gradients, two moments:
    28); those bytes a second."""
    weights = [torch.nn.Parameter(torch.randn(params // 16)) for _ in range(16)]
    for w in weights:
        w.grad = torch.randn_like(w)
    optimizer = torch.optim.AdamW(weights, fused=True)

    def step():
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(3):
        step()
    return 3 * 40 * params / (time.perf_counter() - start) / 1e9


def allreduce_busbw_gbps(mib: int = 512) -> float | None:
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    n = dist.get_world_size()
    buf = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
    seconds = mean_time(lambda: dist.all_reduce(buf))
    return 2 * (n - 1) / n * buf.numel() / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", action="store_true",
                        help="only the eager block's host time, on this machine's CPU")
    if parser.parse_args().host:
        torch.set_num_threads(1)
        print(json.dumps({k: round(v, 3) for k, v in eager_block_ms(torch.device("cpu")).items()}))
        return
    if "RANK" in os.environ:
        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    fp8 = fp8_gemm_tflops()
    block = eager_block_ms(torch.device("cuda"))
    row = {"gemm_tflops": round(gemm_ceiling(torch.device("cuda"))),
           "fp8_gemm_tflops": round(fp8) if fp8 else None,
           "attention_tflops": round(attention_tflops()),
           "hbm_gbps": round(hbm_gbps()), "eager_block_ms": round(block["none"], 3),
           "eager_host_ratios": {k: round(v / block["none"], 2) for k, v in block.items()},
           "node_link_gbps": allreduce_busbw_gbps(),
           "host_link_gbps": round(host_link_gbps()),
           "host_optimizer_gbps": round(host_optimizer_gbps()),
           "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
           "source": f"bench.calibrate on {torch.cuda.get_device_name()}, "
                     f"{datetime.date.today()}"}
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
