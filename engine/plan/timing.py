"""Step time of a training layout, predicted from per-GPU rates (engine/plan/gpus.json, which
`python -m bench.calibrate` measures): the matmuls at the GEMM rate, attention at the attention
kernel's rate, the elementwise work (norms, RoPE, SiLU, casts: their activations written in the
forward and read twice in the backward; selective recompute's again) at memory bandwidth, a
fixed cost per block and micro-batch (kernel launches), the pipeline's bubble, the
communication that does not overlap, and the optimizer's pass over its state. Eager blocks are
also bound by the host, which launches their ops one by one. Torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from engine.errors import SpecError
from engine.model.config import ModelConfig
from engine.parallel.layout import Layout
from engine.train.flops import flops_per_token, matmul_params

GPUS_FILE = Path(__file__).with_name("gpus.json")
ZERO_BUBBLE = ("interleaved-zb", "zbv", "dualpipev")
# eager PyTorch runs the elementwise work as many small kernels, each reading and writing whole
# tensors: ~5× the traffic of the fused kernels of compile (fitted on ten eager runs of the 1.1B
# and 3B shapes on H100s, docs/planner.md)
EAGER_TRAFFIC = 5.0
# the host's time for an eager block's forward and backward, relative to no recompute: full
# recompute runs the forward twice; selective also passes every op through its policy
# (`python -m bench.calibrate --host`)
EAGER_HOST = {"none": 1.0, "full": 1.9, "selective": 2.8}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    peak_tflops: float
    gemm_tflops: float
    fp8_gemm_tflops: float | None  # None: no float8 matmuls (torchao would emulate them)
    attention_tflops: float
    hbm_gbps: float
    node_link_gbps: float   # bus bandwidth of a collective within a node
    network_gbps: float     # per GPU, between nodes
    block_overhead_ms: float  # per compiled block and micro-batch, forward and backward
    eager_block_ms: float     # the host's time to launch an eager block's forward and backward
    host_link_gbps: float     # host-to-GPU copies of pinned memory (CPU offload)
    host_optimizer_gbps: float  # a fused AdamW step on the host, bytes of its state a second
    source: str


def gpus() -> dict[str, Gpu]:
    table = json.loads(GPUS_FILE.read_text())["gpus"]
    return {name: Gpu(name=name, **row) for name, row in table.items()}


@dataclass(frozen=True)
class Timing:
    compute_s: float       # matmuls, attention and elementwise work, recompute included
    bubble_s: float        # the pipeline's idle time
    tp_comm_s: float       # tensor/context-parallel collectives (on the critical path)
    dp_comm_s: float       # gradient reduction / FSDP gathers, all of it
    exposed_dp_s: float    # the part the backward does not hide
    offload_s: float       # CPU offload's copies over PCIe that compute does not hide
    optimizer_s: float
    step_s: float
    comm_bytes: int        # sent per GPU per step, all collectives
    mfu: float


def step_timing(cfg: ModelConfig, layout: Layout, gpu: Gpu, *, seq: int, global_batch: int,
                micro_batch: int, recompute: str, precision: str, fsdp: bool, schedule: str,
                virtual: int, gpus_per_node: int, params_per_gpu: int,
                elementwise_bytes: float, blocks: int, compiled: bool,
                float8_layers: int = 0, cpu_offload: bool = False,
                overlap_grad_reduce: bool = True) -> Timing:
    """`elementwise_bytes`: memory traffic of the non-matmul work of this GPU's step, as fused
    kernels would move it (`compiled`; eager moves EAGER_TRAFFIC times as much); `blocks`: block
    forward-backwards it runs a step (its layers × micro-batches); `float8_layers`: the model's
    layers whose matmuls run in float8 (at the FP8 GEMM rate); `cpu_offload`: FSDP's shards
    in host memory (their copies over PCIe, the optimizer on the CPU); `overlap_grad_reduce`
    false: the backward waits for the gradients' reduction, none of it hidden."""
    if not compiled:
        elementwise_bytes *= EAGER_TRAFFIC
    tokens = global_batch * seq
    per_gpu = tokens * flops_per_token(cfg, seq) / layout.world_size
    attention_share = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq  # causal half
    matmul = tokens * 6 * matmul_params(cfg) / layout.world_size
    attention = tokens * attention_share / layout.world_size
    if recompute == "full":  # the blocks' forward again
        matmul += tokens * 2 * (matmul_params(cfg) - cfg.vocab_size * cfg.hidden_size) \
            / layout.world_size
        attention *= 4 / 3
    compute = (_matmul_s(cfg, matmul, gpu, float8_layers)
               + attention / (gpu.attention_tflops * 1e12)
               + elementwise_bytes / (gpu.hbm_gbps * 1e9) + blocks * gpu.block_overhead_ms / 1e3)
    if not compiled:  # the GPU waits for the host where the kernels are short
        compute = max(compute, blocks * gpu.eager_block_ms * EAGER_HOST[recompute] / 1e3)
    micro = global_batch // (micro_batch * layout.dp)
    bubble = 0.0
    if layout.pp > 1:
        bubble = compute * (layout.pp - 1) / (virtual * micro)
        if schedule in ZERO_BUBBLE:
            bubble /= 3  # the weight-gradient halves fill most of it
    c = 4 if precision == "fp32" else 2
    inner = gpu.node_link_gbps * 1e9
    # TP: per block and micro-batch, 2 all-gathers and 2 reduce-scatters forward (all-reduces
    # without SP: the same bytes), as many backward, a third set again under full recompute
    local_tokens = micro_batch * seq // layout.cp
    tp_bytes = 0
    if layout.tp > 1:
        rounds = 12 if recompute == "full" else 8
        tp_bytes = rounds * (layout.tp - 1) / layout.tp * local_tokens * cfg.hidden_size * c \
            * cfg.num_layers / layout.pp * micro
    cp_bytes = 0
    if layout.cp > 1:  # keys and values gathered forward, their gradients reduced backward
        kv = cfg.num_kv_heads * cfg.head_dim // layout.tp
        cp_bytes = 2 * 2 * (layout.cp - 1) * local_tokens * kv * c * cfg.num_layers \
            / layout.pp * micro
    tp_comm = (tp_bytes + cp_bytes) / inner
    gathers, reduction = _data_parallel(layout, gpu, fsdp, precision, params_per_gpu,
                                        gpus_per_node, micro, cpu_offload)
    # MasterAdamW reduces the fp32 sums of several micro-batches after their backwards
    overlapped = overlap_grad_reduce and not (precision == "bf16-master" and micro > 1)
    exposed = _exposed_dp(compute, micro, gathers.seconds, reduction.seconds, overlapped,
                          cpu_offload)
    dp_bytes, dp_comm = gathers.bytes + reduction.bytes, gathers.seconds + reduction.seconds
    offload, optimizer = _optimizer_s(gpu, params_per_gpu, micro, cpu_offload)
    offload = max(0.0, offload - compute)  # FSDP prefetches the next block's copy
    step = compute + bubble + tp_comm + exposed + offload + optimizer
    return Timing(compute, bubble, tp_comm, dp_comm, exposed, offload, optimizer, step,
                  int(tp_bytes + cp_bytes + dp_bytes), per_gpu / step / (gpu.peak_tflops * 1e12))


def _optimizer_s(gpu: Gpu, params: int, micro: int, cpu_offload: bool) -> tuple[float, float]:
    """Seconds of CPU offload's copies (the fp32 shards in for every forward and backward, the
    fp32 gradients out after it: every micro-batch) and of the host's work. AdamW reads and
    writes weights, gradients, two moments (and masters): ~40 bytes a parameter on the GPU.
    On the host, fp32 without masters: the gradient norm and clipping (12 bytes: read, then
    read and write) and AdamW (28), and each later micro-batch's gradients added to the sums
    (12)."""
    if not cpu_offload:
        return 0.0, params * 40 / (gpu.hbm_gbps * 1e9)
    copies = params * 4 * 3 * micro
    host = params * (40 + 12 * (micro - 1))
    return copies / (gpu.host_link_gbps * 1e9), host / (gpu.host_optimizer_gbps * 1e9)


def _matmul_s(cfg: ModelConfig, flops: float, gpu: Gpu, float8_layers: int) -> float:
    """Seconds of the matmuls: the float8 layers' share at the FP8 GEMM rate, the rest (and
    the head) at the bf16 rate."""
    if not float8_layers:
        return flops / (gpu.gemm_tflops * 1e12)
    if gpu.fp8_gemm_tflops is None:
        raise SpecError(f"{gpu.name} has no float8 matmuls: train it without float8")
    blocks = matmul_params(cfg) - cfg.vocab_size * cfg.hidden_size
    share = float8_layers / cfg.num_layers * blocks / matmul_params(cfg)
    return flops * ((1 - share) / (gpu.gemm_tflops * 1e12)
                    + share / (gpu.fp8_gemm_tflops * 1e12))


class Traffic(NamedTuple):
    bytes: float    # sent per GPU per step
    seconds: float


def _data_parallel(layout: Layout, gpu: Gpu, fsdp: bool, precision: str, params: int,
                   gpus_per_node: int, micro: int, cpu_offload: bool) -> tuple[Traffic, Traffic]:
    """What a GPU sends for data parallelism in a step: FSDP's gathers of the weights, and the
    gradients' reduction. FSDP reshards after each forward and backward, so it gathers the
    weights (compute dtype) for every micro-batch's forward and again for its backward; under a
    pipeline they stay gathered from the first forward to the last backward: once a step. The
    gradients are reduced on the last micro-batch only (every micro-batch under CPU offload,
    whose sums are on the host), in fp32 in every precision: FSDP reduce-scatters them over the
    shard group (under HSDP the shards are all-reduced over the replicas besides); DDP
    all-reduces them (twice a reduce-scatter's bytes): autocast's gradients are fp32 and
    bf16-master's are reduced as fp32 (DDP's hook `_fp32_mean`, MasterAdamW's fp32 sums). A
    group whose ranks (with their TP neighbours) fill more than a node crosses the network."""
    link = {False: gpu.node_link_gbps * 1e9, True: gpu.network_gbps * 1e9}
    reductions = micro if cpu_offload else 1
    if not fsdp:
        n = layout.dp_cp
        sent = 2 * (n - 1) / n * 4 * params * reductions
        return Traffic(0.0, 0.0), Traffic(sent, sent / link[n * layout.tp > gpus_per_node])
    n, r = layout.dp_shard * layout.cp, layout.dp_replicate
    shard_link = link[n * layout.tp > gpus_per_node]
    gathers = 1 if layout.pp > 1 else 2 * micro
    # `params` is a shard: a ring passes on the group's n − 1 others, (n − 1)/n of the whole
    gathered = gathers * (n - 1) * params * (4 if precision == "fp32" else 2)
    scattered = (n - 1) * 4 * params * reductions
    replicated = 2 * (r - 1) / r * 4 * params * reductions
    return Traffic(gathered, gathered / shard_link), Traffic(
        scattered + replicated, scattered / shard_link
        + replicated / link[n * r * layout.tp > gpus_per_node])


def _exposed_dp(compute: float, micro: int, gather_s: float, reduce_s: float, overlapped: bool,
                every_micro: bool) -> float:
    """The data-parallel seconds that compute does not hide. FSDP prefetches each micro-batch's
    gathers under that micro-batch's forward and backward. The gradients are reduced while the
    backward that completes them runs (DDP's buckets, FSDP's reduce-scatter): the last
    micro-batch's (each micro-batch's: `every_micro`), on what of the link that backward's own
    gathers leave; not `overlapped` (waited for, or after the backwards), all of it exposed."""
    share = 1.0 if every_micro else 1 / micro  # of the step's backwards that reduce
    window = share * max(0.0, compute * 2 / 3 - gather_s / 2) if overlapped else 0.0
    return max(0.0, gather_s - compute) + max(0.0, reduce_s - window)
