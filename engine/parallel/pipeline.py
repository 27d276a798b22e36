"""Pipeline parallelism through torch.distributed.pipelining, applied to a plain LlamaModel.

The model's layers are split into `pp_size · virtual` stages. A stage is the model itself with
what it does not own deleted (built on the meta device, materialised afterwards, so no rank ever
holds the whole model): the blocks outside its range, the embedding unless it is the first stage,
the final norm and head unless it is the last. Every parameter keeps its global name
(`layers.17.attn.wq.weight` at any PP), so checkpoints do not depend on the layout.

A stage's output is its hidden states, the last stage's final-normed. The head runs inside the
schedule's loss, fused with cross-entropy (engine/model/fused_loss.py), so full logits are never
materialised. See docs/parallelism.md.

Usage, per rank of the pipeline group (engine/train/build.py and loop.py do this, with tensor
parallel, recompute and FSDP applied to each stage module before it is materialised):

    modules = stage_modules(meta_model, "1f1b", pp_rank, pp_size)      # {stage id: module}
    for m in modules.values(): m.to_empty(device=device); m.init_weights(seed)  # or a load
    model = LocalStages(modules)  # one module under global names: optimizer, checkpoints
    stages = pipeline_stages(modules, pp_size * virtual, pp_group, device)
    is_first, is_last = 0 in modules, pp_size * virtual - 1 in modules
    loss_fn = fused_loss_fn(modules[pp_size * virtual - 1]) if is_last else None
    schedule = build_schedule("1f1b", stages, n_microbatches, loss_fn)
    loss_sum = pipeline_step(schedule, inputs, targets, mask, is_first, is_last, scale)
    clip_grad_norm_(params_of_all_local_stages, max_norm, pp_group)   # engine/parallel/grad_norm.py
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV,
                                          ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

from engine.errors import SpecError
from engine.model.llama import LlamaModel
from engine.parallel.layout import (SINGLE_STAGE, PipelineSchedule, check_layout,
                                    check_schedule, split_layers, stage_ids)

_SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
    "interleaved-zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
IGNORE = -100
"""The target of a token whose loss is masked out: the loss mask travels inside the targets
(see pipeline_step)."""


def stage_modules(model: LlamaModel, schedule: PipelineSchedule, pp_rank: int, pp_size: int,
                  virtual: int = 1,
                  layers_per_stage: list[int] | None = None) -> dict[int, LlamaModel]:
    """This rank's stages of `model` (built on the meta device), by stage id: copies with what
    they do not own deleted, still on the meta device — materialise each with
    `to_empty(device=...)` and `init_weights(seed)` (the init is seeded by global parameter name,
    so the weights equal the unsplit model's) or a checkpoint load.

    Tied embeddings are refused for more than one stage: the first stage's embedding and the last
    stage's head would be one weight on two ranks, whose gradients would have to be summed
    between them every step (Megatron's embedding group); untie the head instead."""
    check_layout(schedule, pp_size, virtual)
    num_stages = pp_size * virtual
    if model.cfg.tie_word_embeddings and num_stages > 1:
        raise SpecError(f"tie_word_embeddings is not supported with {num_stages} pipeline stages: "
                        "the embedding (first stage) and the head (last stage) would be one "
                        "weight on two ranks; train with an untied head or without pipeline "
                        "parallelism")
    ranges = split_layers(model.cfg.num_layers, num_stages, layers_per_stage)
    ids = stage_ids(schedule, pp_rank, pp_size, virtual)
    return {i: _stage_module(model, ranges[i], i == 0, i == num_stages - 1) for i in ids}


def _stage_module(model: LlamaModel, layers: range, is_first: bool, is_last: bool) -> LlamaModel:
    stage = copy.deepcopy(model)  # on the meta device: no memory
    for key in list(stage.layers.keys()):
        if int(key) not in layers:
            del stage.layers[key]
    if not is_first:
        stage.embed = None
    if not is_last:
        stage.norm = None
        stage.lm_head = None
    # A stage's output is its hidden states: the head runs in the loss (fused_loss_fn). Set on
    # the instance, so __call__ and the hooks that wrappers (FSDP2) put on it still run.
    stage.forward = stage.forward_hidden
    return stage


class LocalStages(nn.Module):
    """This rank's stage modules seen as one module under the model's parameter names
    (`layers.17.…`, `lm_head.weight`): what checkpoints, the optimizer's parameter groups and the
    weight checks see, so a checkpoint does not depend on the layout. It shares the stages'
    submodules and is never called: the schedule runs the stages."""

    def __init__(self, modules: dict[int, LlamaModel]):
        super().__init__()
        self.layers = nn.ModuleDict()
        for _, module in sorted(modules.items()):
            self.layers.update(module.layers)
            for part in ("embed", "norm", "lm_head"):
                if getattr(module, part) is not None:
                    setattr(self, part, getattr(module, part))


def pipeline_stages(modules: dict[int, nn.Module], num_stages: int,
                    group: dist.ProcessGroup | DeviceMesh,
                    device: torch.device) -> list[PipelineStage]:
    """torch's stages over this rank's materialised (and wrapped) stage modules, in stage order;
    `group` is the pipeline's process group or 1-D mesh (the job mesh's `pp` dimension)."""
    group = group.get_group() if isinstance(group, DeviceMesh) else group
    return [PipelineStage(module, i, num_stages, device, group=group)
            for i, module in sorted(modules.items())]


def fused_loss_fn(last_stage: LlamaModel) -> Callable[..., torch.Tensor]:
    """The schedule's loss for the last stage: (final-normed hidden states, targets with IGNORE
    where masked, scale) → scale · the sum of the micro-batch's masked token losses, through the
    stage's head fused with cross-entropy (LlamaModel.head_loss, as in one process).

    It reads the head weight at each call, after the stage's forward: under FSDP2 the last stage
    must keep its parameters unsharded after the forward (reshard_after_forward=False, as
    torchtitan does with PP), or the weight read here would be the shard."""
    if last_stage.norm is None:
        raise ValueError("fused_loss_fn takes the last stage's module (the one with the norm "
                         "and head)")

    def loss_fn(hidden: torch.Tensor, labels: torch.Tensor, scale: float | torch.Tensor = 1.0):
        mask = labels != IGNORE
        return last_stage.head_loss(hidden, labels.clamp(min=0), mask) * scale

    return loss_fn


def build_schedule(name: PipelineSchedule, stages: list[PipelineStage], n_microbatches: int,
                   loss_fn: Callable[..., torch.Tensor] | None):
    """torch's schedule `name` over this rank's stages; `loss_fn` (fused_loss_fn) on the rank of
    the last stage, None on the others. Gradients are not divided by the number of
    micro-batches (scale_grads=False): the loss is scaled by the caller, as the loop scales it
    without a pipeline, so both compute the same gradients."""
    if any(stage.is_last for stage in stages) != (loss_fn is not None):
        raise ValueError("loss_fn goes with the last stage: given on its rank, None elsewhere")
    pp_size = stages[0].group_size
    check_schedule(name, pp_size, len(stages), n_microbatches)
    if stages[0].num_stages != pp_size * len(stages):
        raise ValueError(f"{len(stages)} stages on each of {pp_size} ranks, but the stages say "
                         f"the pipeline has {stages[0].num_stages}")
    cls = _SCHEDULES[name]
    first = stages[0] if name in SINGLE_STAGE else stages
    # torch runs the backward only where it has a loss_fn, so every rank gets one; only the
    # last stage's ever calls it
    return cls(first, n_microbatches=n_microbatches, loss_fn=loss_fn or _no_loss_here,
               scale_grads=False)


def _no_loss_here(*_args, **_kwargs) -> torch.Tensor:
    raise RuntimeError("the loss runs on the rank of the last pipeline stage only")


def pipeline_step(schedule, inputs: torch.Tensor | None, targets: torch.Tensor | None,
                  mask: torch.Tensor | None, is_first: bool, is_last: bool,
                  scale: float | torch.Tensor, train: bool = True) -> torch.Tensor | None:
    """Forward and backward of one accumulation (forward only, without gradients, unless
    `train`): the batch is cut into the schedule's micro-batches along dim 0. The first stage's
    rank passes `inputs`, the last stage's `targets` and `mask` (others may pass None). Each
    micro-batch's loss is `scale` times its masked token-loss sum — the loop's scale,
    data-parallel size / global loss tokens — so the gradients equal one process's. Returns, on
    the last stage's rank, the unscaled loss sum (fp32, detached); None elsewhere.

    torch's schedules call loss_fn(output, target) and split only `target` per micro-batch, so
    the mask rides in the targets, as IGNORE at masked positions: one tensor of the targets'
    shape that is split like the inputs."""
    n_microbatches = schedule._n_microbatches  # torch keeps it private
    args = ()
    if is_first:
        args = (inputs,)
        _check_batch(inputs, n_microbatches)
    labels, losses = None, None
    if is_last:
        _check_batch(targets, n_microbatches)
        labels, losses = targets.masked_fill(~mask.bool(), IGNORE), []
    with contextlib.nullcontext() if train else torch.no_grad():
        (schedule.step if train else schedule.eval)(
            *args, target=labels, losses=losses, return_outputs=False,
            loss_kwargs={"scale": scale})
    if not is_last:
        return None
    return torch.stack(losses).detach().sum() / scale


def _check_batch(batch: torch.Tensor, n_microbatches: int) -> None:
    if batch.shape[0] % n_microbatches:
        raise ValueError(f"a batch of {batch.shape[0]} samples does not split into "
                         f"{n_microbatches} equal micro-batches")
