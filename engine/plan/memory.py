"""Memory per GPU of a training layout, predicted before a job runs (torch-free).

What a rank holds between steps is exact (engine/train/held.py measures the same categories):
parameters, gradients, fp32 masters and gradient sums under bf16-master, optimizer moments. The
activations follow Korthikanti et al. (2022), rewritten for this engine's block — pre-norm
RMSNorm normalised in fp32, SwiGLU with gate and up as one GEMM, grouped-query attention through
a fused kernel (no s² scores), the fused loss — and for what each recompute mode keeps
(engine/parallel/recompute.py); the pipeline keeps the activations of the micro-batches in
flight. Temporary buffers are the largest transient allocations of a step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from engine.model.config import ModelConfig
from engine.parallel.layout import Layout, float8_blocks
from engine.plan.shards import Held, rank_params

GIB = 2 ** 30
LOSS_CHUNK = 4096  # tokens per chunk of the fused loss (engine/model/fused_loss.py's chunk_rows)


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU, by category; `activations` and `pipeline` at the peak of a step."""

    parameters: int
    gradients: int
    masters: int
    optimizer: int
    gradient_sums: int
    activations: int
    pipeline: int
    buffers: int
    accumulating: bool  # gradients exist while a forward runs (several micro-batches a step)
    host: int = 0       # in host memory instead (CPU offload: what `held` would be)

    @property
    def held(self) -> int:
        """Between steps: what does not depend on the batch."""
        return (self.parameters + self.gradients + self.masters + self.optimizer
                + self.gradient_sums)

    @property
    def total(self) -> int:
        """The peak: at the start of the step's last backward, when the activations are all
        there and the gradients (with one micro-batch a step) not yet — the backward frees the
        one as it makes the other; or between steps."""
        grads = 0 if self.accumulating else self.gradients
        return max(self.held, self.held - grads + self.activations + self.pipeline + self.buffers)

    def as_dict(self) -> dict[str, int]:
        out = asdict(self)
        out.pop("accumulating")
        return {**out, "total": self.total}


def offloaded(static: dict[str, int]) -> dict[str, int]:
    """CPU offload: what a rank holds between steps moves to host memory."""
    return {**{k: 0 for k in static}, "host": sum(static.values())}


def held_bytes(held: list[Held], precision: str, tp_gradients: bool,
               micro_batches: int) -> dict[str, int]:
    """Parameters, gradients, masters, optimizer state and gradient sums of one rank after an
    update, as engine/train/held.py measures them. AdamW keeps two fp32 moments and a 4-byte
    step count per tensor. bf16-master holds bf16 weights (fp32 norm gains) and their fp32
    masters; over several micro-batches their gradients move into one fp32 buffer of sums after
    each backward. `tp_gradients` (tensor parallel without FSDP, whose reduce-scatter makes
    gradients of its own): the gradients of gate and up leave their stacked GEMM's gradient
    through DTensor.to_local separately, one a copy while the other keeps the stacked gradient
    alive (gate's size more a layer)."""
    numel = sum(h.numel for h in held)
    gates = sum(h.numel for h in held if h.param.name.endswith("w_gate.weight"))
    optimizer = 8 * numel + 4 * len(held)
    if precision == "bf16-master":
        norms = sum(h.numel for h in held if h.param.norm)
        weights = 2 * (numel - norms) + 4 * norms
        summed = micro_batches > 1
        return {"parameters": weights, "gradients": 0 if summed else weights,
                "masters": 4 * (numel - norms), "optimizer": optimizer,
                "gradient_sums": 4 * numel if summed else 0}
    return {"parameters": 4 * numel, "gradients": 4 * (numel + (gates if tp_gradients else 0)),
            "masters": 0, "optimizer": optimizer, "gradient_sums": 0}


@dataclass(frozen=True)
class Shape:
    """What the activation formulas read: the model's widths as one rank computes them."""

    h: int         # hidden
    q: int         # query width (heads × head_dim) on this rank
    kv: int        # key/value width on this rank
    ffn: int       # FFN width on this rank
    heads: int     # query heads on this rank
    d: int         # head_dim
    vocab: int     # vocabulary on this rank
    c: int         # bytes of the compute dtype
    p: int         # bytes of a weight
    sp: int        # what the residual stream and the norms are split by (sequence parallel)
    tp: int


def shape(cfg: ModelConfig, precision: str, tp: int, sequence_parallel: bool,
          fsdp: bool = False) -> Shape:
    """`fsdp`: FSDP wraps the model (fsdp_wraps)."""
    c = 4 if precision == "fp32" else 2
    return Shape(h=cfg.hidden_size, q=cfg.num_heads * cfg.head_dim // tp,
                 kv=cfg.num_kv_heads * cfg.head_dim // tp, ffn=cfg.intermediate_size // tp,
                 heads=cfg.num_heads // tp, d=cfg.head_dim, vocab=cfg.vocab_size // tp,
                 c=c, p=c if fsdp else 2 if precision == "bf16-master" else 4,
                 sp=tp if sequence_parallel and tp > 1 else 1, tp=tp)


def layer_activations(s: Shape, tokens: int, recompute: str, precision: str, cp: int,
                      compiled: bool = False, float8: bool = False) -> int:
    """Bytes one block keeps from its forward for its backward, for `tokens` of this rank.

    none, compiled: what inductor's partitioner keeps, recomputing the elementwise ops from it —
    the block's input, the norms' outputs and their fp32 reciprocal RMS, q/k/v after RoPE, the
    kernel's output (twice: as it comes and reshaped for o) and log-sum-exp, the gate/up GEMM's
    output and the product, and the weights' copies as below.
    none, eager: each norm's fp32 input and its output, q/k/v after RoPE with k and v repeated
    to the query heads, the kernel's output and log-sum-exp, attention's output reshaped for o,
    the gate/up GEMM's output, SiLU's output and the product; under sequence parallelism the
    gathered norm outputs the matmuls read too; and the weights' copies the backward needs (the
    stacked gate/up weight; under autocast the compute-dtype casts of all matrices).
    A `float8` block (torchao's linears, gate and up as two GEMMs) has no stacked weight, and
    compiled, its linears' inputs (the norms' outputs, the product) are recomputed too (under
    autocast it keeps less than this, by 8–29% from run to run on the CPU).
    selective: the block's input and the matmul and kernel outputs (the row-parallel ones
    whole before their reduction). full: the block's input. Context parallelism: keys and
    values gathered over the `cp` ranks."""
    h, c, sp = s.h, s.c, s.sp
    if recompute == "full":
        return tokens * c * h // sp
    gathered_kv = 2 * s.kv * (cp - 1)
    if recompute == "selective":
        partial = 2 * h if s.tp > 1 else 2 * h // sp
        per_token = c * (h // sp + s.q + 2 * s.kv + s.q + 2 * s.ffn + partial + gathered_kv) \
            + 4 * s.heads
        return tokens * per_token
    stacked = 0 if float8 else 2 * s.ffn * h
    if compiled:  # the partitioner's choice (tests/test_plan.py measures it)
        linear_inputs = 0 if float8 else 2 * h + s.ffn
        per_token = c * (h // sp + linear_inputs + 3 * s.q + 2 * s.kv + 2 * s.ffn
                         + gathered_kv) + 4 * s.heads + 8
        casts = 0 if float8 else 3 * s.ffn * h + (2 * s.q + 2 * s.kv) * h
        return tokens * per_token + (c * stacked if s.p == c else c * casts)
    norms = 2 * ((4 + c) * h // sp + (c * h if sp > 1 else 0)) + 8
    per_token = norms + c * (5 * s.q + 4 * s.ffn + gathered_kv) + 4 * s.heads
    if precision == "bf16-master":  # the stacked weight and the fp32 gains' casts
        weights = 2 * stacked + 2 * 2 * h
    elif s.p == c:  # weights in the compute dtype (fp32; FSDP's copies): the stacked weight
        weights = c * stacked
    else:  # autocast's cached casts of every matrix, and the stacked weight's cast (float8
        # linears keep fp32 inputs instead: 16% less in all on the CPU, not modelled apart)
        weights = 2 * (3 * s.ffn * h + (2 * s.q + 2 * s.kv) * h) + 2 * 2 * h
    return tokens * per_token + weights


def float8_layer(cfg: ModelConfig, spec, index: int) -> bool:
    """Whether the model's layer `index` runs its matmuls in float8 (all but the first and
    last `bf16_blocks`) under training spec `spec`."""
    return spec.float8 is not None and index in float8_blocks(cfg.num_layers,
                                                               spec.float8.bf16_blocks)


def edge_activations(s: Shape, tokens: int, first: bool, last: bool) -> int:
    """The embedding's output (first stage), RoPE's tables, and the final norm with the fused
    loss (last stage), whose forward already sums the head's weight gradient."""
    out = tokens * (2 * s.d * s.c + 4)
    if first:
        out += tokens * s.c * s.h // s.sp
    if last:
        out += tokens * (4 + s.c) * s.h // s.sp + s.vocab * s.h * s.p
    return out


def sharded(spec, layout: Layout) -> bool:
    """Whether FSDP shards the parameters (more than one rank to shard them over)."""
    return spec.data_parallel == "fsdp" and layout.dp_shard * layout.cp > 1


def fsdp_wraps(spec, layout: Layout) -> bool:
    """Whether FSDP wraps the model (sharded, or offloaded on one rank): its mixed-precision
    policy then gathers the weights in the compute dtype, which the forward reads."""
    return sharded(spec, layout) or spec.cpu_offload


def spec_params(cfg: ModelConfig, spec, layout: Layout, pp_rank: int) -> list[Held]:
    """What pipeline rank `pp_rank` holds under training spec `spec` (a TrainSpec)."""
    return rank_params(cfg, layout, sharded(spec, layout), pp_rank, spec.pipeline_schedule,
                       spec.virtual_stages, spec.pipeline_layers)


def rank_memory(cfg: ModelConfig, spec, layout: Layout, pp_rank: int,
                held: list[Held] | None = None) -> Memory:
    """The memory of the most loaded GPU of pipeline rank `pp_rank` under training spec `spec`
    (a TrainSpec: precision, data_parallel, micro_batch_size, recompute, pipeline fields);
    `held`: its parameters, when already known (spec_params)."""
    fsdp = sharded(spec, layout)
    held = held if held is not None else spec_params(cfg, spec, layout, pp_rank)
    micro = spec.micro_batches(layout)
    static = held_bytes(held, spec.precision, layout.tp > 1 and not fsdp, micro)
    s = shape(cfg, spec.precision, layout.tp, spec.sequence_parallel, fsdp_wraps(spec, layout))
    tokens = spec.micro_batch_size * spec.data.seq_length // layout.cp
    indices = [int(h.param.name.split(".")[1]) for h in held
               if h.param.name.endswith("attn_norm.weight")]  # layers.{index}.attn_norm
    layers, float8 = len(indices), sum(float8_layer(cfg, spec, i) for i in indices)
    names = {h.param.name for h in held}
    first, last = "embed.weight" in names, "norm.weight" in names
    one = layer_activations(s, tokens, spec.recompute, spec.precision, layout.cp, spec.compile)
    one_float8 = layer_activations(s, tokens, spec.recompute, spec.precision, layout.cp,
                                   spec.compile, float8=True)
    activations = (layers - float8) * one + float8 * one_float8 \
        + edge_activations(s, tokens, first, last)
    head_gradient = s.vocab * s.h * s.p if last else 0  # one for every micro-batch
    pipeline = int((activations - head_gradient) * (in_flight(spec, layout, pp_rank, micro) - 1))
    # transient: a block recomputed whole in its backward, or before it the loss's chunk of
    # logits and their gradient (compute dtype: the compiled chunk kernel keeps the fp32 logits
    # in registers), whichever is larger; FSDP's gathered block (and the next, prefetched) and
    # its gradients before the reduce-scatter; bf16-master's gradients before they join the
    # fp32 sums (DDP's buckets are the gradients themselves: gradient_as_bucket_view)
    rebuilt = (layer_activations(s, tokens, "none", spec.precision, layout.cp) - one) \
        if layers and spec.recompute != "none" else 0
    buffers = max(rebuilt, 2 * s.c * min(tokens, LOSS_CHUNK) * s.vocab if last else 0)
    block = sum(h.numel for h in held if h.param.name.startswith("layers.")) // max(layers, 1)
    if fsdp_wraps(spec, layout):
        shards = layout.dp_shard * layout.cp
        buffers += block * shards * (2 * s.c + 4)
    if static["gradient_sums"]:
        buffers += static["parameters"]
    if spec.cpu_offload:  # the model's own weights (embedding, norm, head) gathered whole;
        # the gradients go to the host after every micro-batch (engine/train/loop.py)
        edges = sum(h.numel for h in held if not h.param.name.startswith("layers."))
        buffers += edges * layout.dp_shard * layout.cp * s.c
        return Memory(activations=activations, pipeline=pipeline, buffers=buffers,
                      accumulating=False, **offloaded(static))
    return Memory(activations=activations, pipeline=pipeline, buffers=buffers,
                  accumulating=micro > 1, **static)


def in_flight(spec, layout: Layout, pp_rank: int, micro: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at once: all of them under GPipe;
    1F1B's warm-up (pp − rank); the interleaved and V schedules' warm-up of (pp − rank − 1)·2 +
    (v − 1)·pp + 1 stage-forwards, each 1/v of the rank's layers (Megatron-LM's count)."""
    if layout.pp == 1:
        return 1.0
    if spec.pipeline_schedule == "gpipe":
        return float(micro)
    if spec.pipeline_schedule == "1f1b":
        return float(min(micro, layout.pp - pp_rank))
    v = spec.virtual_stages
    warmup = (layout.pp - pp_rank - 1) * 2 + (v - 1) * layout.pp + 1
    return min(micro * v, warmup) / v
