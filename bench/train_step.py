"""Training-step throughput: the engine's model and loss vs Hugging Face transformers'
LlamaForCausalLM and the yardstick (bench/yardstick.py: a plain PyTorch Llama), same shape, same
numerics, same optimizer, in one run.

    python -m bench.train_step --shape tinyllama-1.1b --seq 4096 --micro-batch 4 \
        --attention flash_attn_4

Numerics: `autocast` = bf16 autocast over fp32 weights and optimizer state (the engine's
`precision: bf16`, what users train with); `master` = bf16 weights with fp32 master weights and
optimizer state in MasterAdamW (`precision: bf16-master`); `bf16` = pure bf16 weights and state.
MFU = (6·N + 12·L·h·s)·tokens/s / peak, N = non-embedding parameters + LM head
(engine/train/flops.py); peak from the GPU's name. `--attention` sets our model's
attention_backend (flash_attn_4 needs the flash-attn-4 package). The last two columns: a row's
tokens/s over the fastest yardstick and HF rows of the same sequence length before it in the run
(`--impl` runs them first by default).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time

import torch
import torch.nn.functional as F
from pydantic import ValidationError

from bench import yardstick
from bench.clocks import ClockSampler, ClockSummary
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.parallel.float8 import apply_float8
from engine.model.hf_names import to_hf_name
from engine.train.flops import flops_per_token, peak_flops
from engine.train.loop import set_split_k_reductions
from engine.train.master_adamw import MasterAdamW, norm_gains

SHAPES = {
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                           num_heads=32, num_kv_heads=4),
    # Llama-3.2-3B's layers (head_dim 128, 8 KV heads) with Llama-2's vocabulary, untied head
    "llama-3.2-3b": dict(vocab_size=32000, hidden_size=3072, intermediate_size=8192, num_layers=28,
                         num_heads=24, num_kv_heads=8),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8),
    # OpenLLaMA-3B: head_dim 100, which flash-attn-4's Hopper kernels do not take
    "llama-3b": dict(vocab_size=32000, hidden_size=3200, intermediate_size=8640, num_layers=26,
                     num_heads=32, num_kv_heads=32),
}


# Our model's attention backends the benches can choose (flash_attn_4 needs flash-attn-4).
ATTENTION = ("sdpa", "flash_attn_4")

_initial: dict[tuple, dict[str, torch.Tensor]] = {}


def initial_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The engine's seeded initialisation (on the CPU, kept per shape): both implementations start
    from the same weights, so the loss column compares them too."""
    key = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
           cfg.num_kv_heads)
    if key not in _initial:
        _initial.clear()
        model = LlamaModel(cfg)
        model.init_weights(0)
        _initial[key] = model.state_dict()
    return _initial[key]


def add_reductions_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bf16-reductions", default="off", choices=["on", "off"],
                   help="let cuBLAS reduce split-K partial sums in bf16/fp16 (torch's default: on; "
                        "the engine's training loop turns it off)")


def build(impl: str, cfg: ModelConfig, numerics: str, compile_mode: str, loss: str, device,
          attention: str = "sdpa", float8: str = "off"):
    dtype = torch.bfloat16 if numerics == "bf16" else torch.float32
    if impl == "ours":  # validated: refuses a backend that cannot run this shape, before any work
        cfg = ModelConfig.model_validate({**cfg.model_dump(), "attention_backend": attention})
    state = initial_state(cfg)
    if impl == "ours":
        with torch.device("meta"):
            model = LlamaModel(cfg)
        model.load_state_dict(state, assign=True)
        model.to(device=device, dtype=dtype)
        if float8 != "off":  # the training spec's float8 section with this recipe
            apply_float8(model, float8, 1, torch.device(device))
        if compile_mode == "block":
            for block in model.layers.values():
                block.compile()
        elif compile_mode == "model":
            model.compile()
        n = None

        def loss_fn(tokens):
            nonlocal n
            n = n or tokens[:, 1:].numel()
            if loss == "fused":  # the engine's training path: chunked head + CE
                return model(tokens[:, :-1], targets=tokens[:, 1:]) / n
            logits = model(tokens[:, :-1])
            return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    elif impl == "yardstick":
        with torch.device("meta"):
            model = yardstick.Llama(cfg)
        model.load_state_dict(state, assign=True)
        model.to(device=device, dtype=dtype)
        if compile_mode != "off":  # the yardstick is compiled whole, as its users would
            model.compile()

        def loss_fn(tokens):
            return yardstick.loss(model, tokens)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(**cfg.to_hf(), attn_implementation="sdpa")
        with torch.device(device):
            model = LlamaForCausalLM(hf_cfg).to(dtype)
        model.load_state_dict({to_hf_name(k): v for k, v in state.items()})
        if compile_mode == "block":
            for layer in model.model.layers:
                layer.compile()
        elif compile_mode == "model":
            model.compile()

        def loss_fn(tokens):
            return model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
    if numerics == "master":  # the model's weights become bf16, their fp32 masters stay in opt
        # as the training loop on CUDA: our norm gains stay fp32 (HF's norm would then return
        # fp32), the update is compiled
        opt = MasterAdamW(model.parameters(), lr=1e-4,
                          keep_fp32=norm_gains(model) if impl == "ours" else (), compile=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return model, opt, loss_fn


def numerics_context(numerics: str):
    """bf16 autocast for `autocast`; the other modes hold their compute dtype in the weights."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if numerics == "autocast" else contextlib.nullcontext()


def train_step(loss_fn, opt, tokens, ctx) -> torch.Tensor:
    """One forward + backward + optimizer step, queued on the GPU; the loss, detached."""
    with ctx:
        loss = loss_fn(tokens)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def timed_step(loss_fn, opt, tokens, ctx) -> tuple[float, torch.Tensor]:
    """Seconds of one step from an idle GPU to an idle GPU, and its loss."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    loss = train_step(loss_fn, opt, tokens, ctx)
    torch.cuda.synchronize()
    return time.perf_counter() - t, loss


def back_to_back(loss_fn, opt, tokens, ctx, steps: int) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of `steps` steps queued one after another with no synchronisation (CUDA
    events between steps), and the last step's loss."""
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    marks[0].record()
    for mark in marks[1:]:
        loss = train_step(loss_fn, opt, tokens, ctx)
        mark.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])], loss


def measure(impl, cfg, numerics, compile_mode, loss, seq, mb, steps, warmup, device, attention,
            float8="off"):
    torch.manual_seed(0)
    model, opt, loss_fn = build(impl, cfg, numerics, compile_mode, loss, device, attention,
                                float8)
    tokens = torch.randint(0, cfg.vocab_size, (mb, seq + 1), device=device)
    ctx = numerics_context(numerics)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        timed_step(loss_fn, opt, tokens, ctx)
    with ClockSampler(torch.cuda.current_device()) as clocks:
        times, loss = back_to_back(loss_fn, opt, tokens, ctx, steps)
    step_time = statistics.median(times)
    tps = mb * seq / step_time
    flops = flops_per_token(cfg, seq) * tps
    peak = peak_flops(torch.device(device))
    result = dict(impl=impl, numerics=numerics, float8=float8, compile=compile_mode, seq=seq,
                  mb=mb, attention=attention,
                  tokens_per_s=tps, tflops=flops / 1e12, mfu=flops / peak if peak else float("nan"),
                  peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30, loss=loss.item(),
                  clocks=clocks.summary)
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return result


def clock_columns(c: ClockSummary | None) -> str:
    """The SM MHz and power columns of a row: median clock; mean draw (share of samples capped)."""
    return "n/a | n/a" if c is None else f"{c.sm_mhz:.0f} | {c.power_w:.0f} ({c.capped:.0%})"


def mean_time(fn, iters: int = 20) -> float:
    """Mean seconds of `fn` on the GPU (or the CPU, without one) over `iters` calls, after 3
    warm-up calls."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for _ in range(3):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters


def gemm_rate(m: int, k: int, n: int, device, iters: int = 20) -> float:
    """TFLOP/s of a bf16 [m, k] x [k, n] matmul alone (row-major operands, back to back)."""
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    return 2 * m * k * n / mean_time(lambda: a @ b, iters) / 1e12


def gemm_ceiling(device) -> float:
    """TFLOP/s of a bf16 8192³ matmul on this card now (mean of 10 after 3 warm-ups): machines of
    one GPU model differ by several percent, so each table carries its own ceiling."""
    return gemm_rate(8192, 8192, 8192, device, iters=10)


def ratio(rate: float, reference: float | None) -> str:
    """A row's tokens/s over the fastest reference row measured before it in the same run."""
    return f"{rate / reference:.2f}" if reference else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="tinyllama-1.1b")
    p.add_argument("--layers", type=int, default=None,
                   help="the shape's layers cut to this many (its GEMM shapes on a smaller card)")
    p.add_argument("--seq", type=int, nargs="+", default=[4096])
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--tokens-per-micro-batch", type=int, default=None,
                   help="instead of --micro-batch: micro-batch = this // seq, for each seq")
    p.add_argument("--impl", nargs="+", default=["hf", "yardstick", "ours"],
                   choices=["hf", "yardstick", "ours"])
    p.add_argument("--numerics", nargs="+", default=["autocast"], choices=["autocast", "master", "bf16"])
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "block", "model"],
                   help="torch.compile modes for ours")
    p.add_argument("--hf-compile", nargs="+", default=None, choices=["off", "block", "model"],
                   help="torch.compile modes for HF (default: those of --compile)")
    p.add_argument("--yardstick-compile", default="model", choices=["off", "model"],
                   help="the yardstick: whole model compiled (its definition) or eager")
    p.add_argument("--loss", default="fused", choices=["fused", "full"],
                   help="ours: chunked head + CE (the engine's default) or full fp32 logits")
    p.add_argument("--attention", nargs="+", default=["sdpa"], choices=ATTENTION,
                   help="ours: the model's attention_backend(s) (HF always uses SDPA)")
    p.add_argument("--sdpa", default="auto", choices=["auto", "cudnn", "flash"],
                   help="scaled_dot_product_attention backend preference")
    p.add_argument("--float8", nargs="+", default=["off"],
                   choices=["off", "tensorwise", "rowwise"],
                   help="ours: the blocks' matmuls in float8 (torchao), first and last in bf16")
    add_reductions_argument(p)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    device = "cuda"
    set_split_k_reductions(low_precision=args.bf16_reductions == "on")
    if args.sdpa != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        first = SDPBackend.CUDNN_ATTENTION if args.sdpa == "cudnn" else SDPBackend.FLASH_ATTENTION
        order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                       SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
        sdpa_kernel(order, set_priority=True).__enter__()
    shape = SHAPES[args.shape] | ({"num_layers": args.layers} if args.layers else {})
    print(f"# {torch.cuda.get_device_name()} (bf16 8192³ matmul {gemm_ceiling(device):.0f} TFLOP/s) | "
          f"torch {torch.__version__} | shape {args.shape}"
          f"{f' (first {args.layers} layers)' if args.layers else ''} | "
          f"loss {args.loss} | sdpa {args.sdpa} | bf16 reductions {args.bf16_reductions} | median of {args.steps} back-to-back steps after {args.warmup} warm-up")
    print("| impl | numerics | compile | attention | seq | micro-batch | tokens/s | TFLOP/s | MFU | "
          "peak mem GiB | SM MHz | W (power-capped) | loss | × yardstick | × HF |")
    print("|---" * 15 + "|")
    runs = {"hf": [(c, "sdpa", "off") for c in args.hf_compile or args.compile],
            "yardstick": [(args.yardstick_compile, "sdpa", "off")],
            "ours": [(c, a, f) for c in args.compile for a in args.attention
                     for f in args.float8]}
    for seq in args.seq:
        fastest: dict[str, float] = {}  # impl -> its best tokens/s at this seq so far
        cfg = ModelConfig(**shape, max_position_embeddings=max(seq, 4096))
        mb = max(1, args.tokens_per_micro_batch // seq) if args.tokens_per_micro_batch else args.micro_batch
        for numerics in args.numerics:
            for impl in args.impl:
                for comp, attention, float8 in runs[impl]:
                    name = impl if float8 == "off" else f"{impl}, float8 {float8}"
                    row = f"| {name} | {numerics} | {comp} | {attention} | {seq} | {mb} |"
                    try:
                        r = measure(impl, cfg, numerics, comp, args.loss, seq, mb,
                                    args.steps, args.warmup, device, attention, float8)
                    except torch.OutOfMemoryError:
                        r = None
                    except ValidationError as exc:  # flash_attn_4 with a head_dim it lacks (3B)
                        print(f"{row} n/a: {exc.errors()[0]['msg']} | | | | | | |", flush=True)
                        continue
                    if r is None:  # outside the except: its traceback no longer holds the model
                        print(f"{row} OOM | | | | | | |", flush=True)
                        gc.collect()
                        torch.cuda.empty_cache()
                        continue
                    rate = r["tokens_per_s"]
                    fastest[impl] = max(rate, fastest.get(impl, 0.0))
                    print(f"{row} {rate:,.0f} | {r['tflops']:.1f} | {r['mfu']:.1%} | "
                          f"{r['peak_mem_gib']:.1f} | {clock_columns(r['clocks'])} | "
                          f"{r['loss']:.3f} | {ratio(rate, fastest.get('yardstick'))} | "
                          f"{ratio(rate, fastest.get('hf'))} |", flush=True)

if __name__ == "__main__":
    main()
