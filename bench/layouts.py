"""Weight layouts of a block's fused GEMMs, measured against each other in one run.

MLP (`--mlp`): gate and up as one GEMM over `stacked` [gate; up] weights, over `rows`
interleaved one by one, over interleaved blocks of 32/64/128 rows (`blocks64` is the engine's
SwiGLU), as two GEMMs (`separate`), or the stacked GEMM with a hand-written Triton SwiGLU kernel
(`triton`, needs triton). Attention (`--qkv`): q, k, v as three GEMMs (`separate`, the engine's),
k and v as one (`kv`), or all three grouped per KV head as Megatron-LM lays them out (`grouped`).

    python -m bench.layouts --mlp-alone                 # the MLP alone: kernels, fwd+bwd time
    python -m bench.layouts --mlp stacked rows blocks64 triton --attention flash_attn_4
    python -m bench.layouts --mlp blocks64 --qkv separate kv grouped --attention flash_attn_4

Each run swaps SwiGLU.forward (and SwiGLU.BLOCK) / Attention.forward and then times bench.train_step's step (1.1B
shape, autocast, compiled blocks). Every layout computes the same function: the engine's is
checked against the plain formula in tests/test_model.py.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch
import torch.nn.functional as F

from bench.train_step import ATTENTION, SHAPES, gemm_ceiling, mean_time, measure
from engine.model.config import ModelConfig
from engine.model.attention import Attention
from engine.model.llama import SwiGLU
from engine.model.rope import apply_rope
from engine.train.loop import set_split_k_reductions


def _stacked(mlp, x):
    gate, up = F.linear(x, torch.cat((mlp.w_gate.weight, mlp.w_up.weight))).chunk(2, dim=-1)
    return mlp.w_down(F.silu(gate) * up)


def _separate(mlp, x):
    return mlp.w_down(F.silu(mlp.w_gate(x)) * mlp.w_up(x))


# name -> (SwiGLU.forward, SwiGLU.BLOCK): the interleaved layouts are the engine's own forward
# with another block of rows (1 = row by row).
ENGINE_BLOCK = SwiGLU.BLOCK
MLP = {"stacked": (_stacked, ENGINE_BLOCK), "rows": (SwiGLU.forward, 1),
       "blocks32": (SwiGLU.forward, 32), "blocks64": (SwiGLU.forward, 64),
       "blocks128": (SwiGLU.forward, 128), "separate": (_separate, ENGINE_BLOCK)}


@functools.cache
def _triton_swiglu():
    """[..., 2n] stacked gate/up -> silu(gate) * up, forward and backward each one pass that
    reads every input once (a custom op, so compiled blocks stay whole)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fwd_kernel(y_ptr, h_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < n
        g = tl.load(y_ptr + row * 2 * n + cols, mask=keep).to(tl.float32)
        u = tl.load(y_ptr + row * 2 * n + n + cols, mask=keep).to(tl.float32)
        tl.store(h_ptr + row * n + cols, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def bwd_kernel(y_ptr, dh_ptr, dy_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < n
        g = tl.load(y_ptr + row * 2 * n + cols, mask=keep).to(tl.float32)
        u = tl.load(y_ptr + row * 2 * n + n + cols, mask=keep).to(tl.float32)
        dh = tl.load(dh_ptr + row * n + cols, mask=keep).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(dy_ptr + row * 2 * n + cols, (dh * u * s * (1 + g * (1 - s))).to(dy_ptr.dtype.element_ty), mask=keep)
        tl.store(dy_ptr + row * 2 * n + n + cols, (dh * g * s).to(dy_ptr.dtype.element_ty), mask=keep)

    @torch.library.custom_op("lmforge_bench::swiglu_fwd", mutates_args=())
    def swiglu_fwd(y: torch.Tensor) -> torch.Tensor:
        rows, n = y.reshape(-1, y.shape[-1]).shape[0], y.shape[-1] // 2
        h = y.new_empty(rows, n)
        fwd_kernel[(rows, triton.cdiv(n, 1024))](y.contiguous(), h, n, BLOCK=1024)
        return h.view(*y.shape[:-1], n)

    @swiglu_fwd.register_fake
    def _(y):
        return y.new_empty(*y.shape[:-1], y.shape[-1] // 2)

    @torch.library.custom_op("lmforge_bench::swiglu_bwd", mutates_args=())
    def swiglu_bwd(y: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
        rows, n = y.reshape(-1, y.shape[-1]).shape[0], y.shape[-1] // 2
        dy = torch.empty_like(y)
        bwd_kernel[(rows, triton.cdiv(n, 1024))](y.contiguous(), dh.contiguous(), dy, n, BLOCK=1024)
        return dy

    @swiglu_bwd.register_fake
    def _(y, dh):
        return torch.empty_like(y)

    swiglu_fwd.register_autograd(lambda ctx, dh: swiglu_bwd(ctx.saved_tensors[0], dh),
                                 setup_context=lambda ctx, inputs, out: ctx.save_for_backward(inputs[0]))

    def forward(mlp, x):
        return mlp.w_down(swiglu_fwd(F.linear(x, torch.cat((mlp.w_gate.weight, mlp.w_up.weight)))))
    return forward


def _kv(attn, x, cos, sin):
    batch, seq, _ = x.shape
    d = attn.head_dim
    q = attn.wq(x).view(batch, seq, -1, d)
    kv = F.linear(x, torch.cat((attn.wk.weight, attn.wv.weight))).view(batch, seq, 2, -1, d)
    out = attn.kernel(apply_rope(q, cos, sin), apply_rope(kv[:, :, 0], cos, sin), kv[:, :, 1].contiguous())
    return attn.wo(out.reshape(batch, seq, -1))


def _grouped(attn, x, cos, sin):
    """Per KV head: its query heads, then its key, then its value (Megatron-LM's fused QKV)."""
    batch, seq, hidden = x.shape
    d = attn.head_dim
    kv_heads = attn.wk.weight.shape[0] // d
    group = attn.wq.weight.shape[0] // d // kv_heads
    w = torch.cat((attn.wq.weight.view(kv_heads, group, d, hidden),
                   attn.wk.weight.view(kv_heads, 1, d, hidden),
                   attn.wv.weight.view(kv_heads, 1, d, hidden)), dim=1)
    y = F.linear(x, w.flatten(0, 2)).view(batch, seq, kv_heads, group + 2, d)
    q = y[:, :, :, :group].flatten(2, 3)
    out = attn.kernel(apply_rope(q, cos, sin), apply_rope(y[:, :, :, group], cos, sin),
                      y[:, :, :, group + 1].contiguous())
    return attn.wo(out.reshape(batch, seq, -1))


QKV = {"separate": Attention.forward, "kv": _kv, "grouped": _grouped}


def use_mlp(name: str):
    """Set SwiGLU's forward (and block of interleaved rows) to the layout `name`; return it."""
    SwiGLU.forward, SwiGLU.BLOCK = (_triton_swiglu(), ENGINE_BLOCK) if name == "triton" else MLP[name]
    return SwiGLU.forward


def mlp_alone(names: list[str], tokens: int, cfg: ModelConfig) -> None:
    """Forward + backward of one MLP under autocast, compiled, and its kernels (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    print(f"# MLP alone: {tokens} tokens, hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, "
          f"autocast over fp32 weights, compiled; {torch.cuda.get_device_name()}")
    for name in names:
        torch.manual_seed(0)
        mlp = SwiGLU(cfg).cuda()
        x = torch.randn(tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        forward = torch.compile(use_mlp(name))

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = forward(mlp, x)
            out.float().square().mean().backward()

        ms = mean_time(step) * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"\n## {name}: {ms:.3f} ms forward + backward; its kernels other than GEMMs (ms):")
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
            if e.device_time_total > 0 and not any(g in e.key for g in ("nvjet", "gemm", "Memset")):
                print(f"  {e.device_time_total / 5 / 1e3:7.3f}  {e.key[:100]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mlp", nargs="+", default=["blocks64"], choices=[*MLP, "triton"])
    p.add_argument("--qkv", nargs="+", default=["separate"], choices=QKV)
    p.add_argument("--mlp-alone", action="store_true", help="time the MLP alone for each --mlp")
    p.add_argument("--attention", default="sdpa", choices=ATTENTION)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    args = p.parse_args()
    cfg = ModelConfig(**SHAPES["tinyllama-1.1b"], max_position_embeddings=max(args.seq, 4096))
    if args.mlp_alone:
        mlp_alone(args.mlp, args.seq * args.micro_batch, cfg)
        return
    set_split_k_reductions(low_precision=False)
    print(f"# {torch.cuda.get_device_name()} (bf16 8192³ matmul {gemm_ceiling('cuda'):.0f} TFLOP/s) | "
          f"torch {torch.__version__} | tinyllama-1.1b | seq {args.seq} | micro-batch {args.micro_batch} | "
          f"autocast | compiled blocks | attention {args.attention}")
    print("| MLP layout | q/k/v layout | tokens/s | MFU |\n|---|---|---:|---:|")
    for mlp, qkv in itertools.product(args.mlp, args.qkv):
        use_mlp(mlp)
        Attention.forward = QKV[qkv]
        torch._dynamo.reset()
        r = measure("ours", cfg, "autocast", "block", "fused", args.seq, args.micro_batch, 10, 3,
                    "cuda", args.attention)
        print(f"| {mlp} | {qkv} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
