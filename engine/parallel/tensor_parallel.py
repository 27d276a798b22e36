"""Tensor + sequence parallelism (Megatron-LM's scheme) applied to a LlamaModel with DTensor.

Per block: the q/k/v and gate/up projections are column-parallel (each rank holds whole heads and
a slice of the FFN width), the attention output and down projections row-parallel. Under sequence
parallelism the residual stream and the norms are sharded along the sequence between them: a
row-parallel output is reduce-scattered into sequence shards and gathered again before the next
column-parallel input, so the norms' activations are split over the TP ranks too. The embedding
is vocab-parallel; the LM head's weight is sharded over the vocabulary and the fused head +
cross-entropy (engine/model/vocab_parallel_loss.py) works on each rank's vocabulary slice.
"""

from __future__ import annotations

from functools import partial

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                               RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from engine.model.llama import LlamaModel


def apply_tensor_parallel(model: LlamaModel, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard the model's parameters over `tp_mesh` (on the meta device, before materialising:
    each rank then only ever allocates its shards)."""
    stream = Shard(1) if sequence_parallel else Replicate()
    top = {"embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream,
                                    use_local_output=not sequence_parallel)}
    if sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.lm_head is not None:  # the logits path; the fused loss reads its weight's shard
        top["lm_head"] = ColwiseParallel(input_layouts=stream, output_layouts=Replicate())
    parallelize_module(model, tp_mesh, {k: v for k, v in top.items()
                                        if getattr(model, k, None) is not None})
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(stream, sequence_parallel))
        block.mlp.register_forward_pre_hook(partial(_gather_for_local_weights, tp_mesh, stream))
    if sequence_parallel and (model.embed is None or model.norm is None):  # a pipeline stage
        _plain_stage_boundaries(model, tp_mesh)


def _plain_stage_boundaries(stage: LlamaModel, tp_mesh: DeviceMesh) -> None:
    """A pipeline stage sends and receives plain tensors: between stages the residual stream's
    local sequence shard (a stage without the embedding makes it a DTensor again, so that its
    positions count the whole sequence); from the last stage, into the loss, the whole
    final-normed sequence, as the vocab-parallel loss would gather it."""
    if stage.embed is None:
        stage.register_forward_pre_hook(
            lambda _module, args: (DTensor.from_local(args[0], tp_mesh, [Shard(1)]), *args[1:]))
    gather = stage.norm is not None
    stage.register_forward_hook(
        lambda _module, _args, out: (out.redistribute(placements=[Replicate()]) if gather
                                     else out).to_local())


def _gather_for_local_weights(tp_mesh: DeviceMesh, stream, _module, args):
    """The MLP's input as a plain tensor over the whole sequence: SwiGLU multiplies it with its
    weights' local shards, so the input's gradient is each rank's partial sum, summed (or
    reduce-scattered into sequence shards) on the way back."""
    x = args[0] if isinstance(args[0], DTensor) else DTensor.from_local(args[0], tp_mesh, [stream])
    return (x.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()]),)


def _block_plan(stream, sequence_parallel: bool) -> dict:
    # attention sees a plain tensor over the whole sequence; its projections are modules whose
    # column-parallel inputs sum their gradients over the ranks
    gathered = PrepareModuleInput(input_layouts=(stream, None, None),
                                  desired_input_layouts=(Replicate(), None, None),
                                  use_local_output=True)
    plan = {
        "attn": gathered,
        "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
        "attn.wo": RowwiseParallel(output_layouts=stream, use_local_output=not sequence_parallel),
        "mlp.w_gate": ColwiseParallel(), "mlp.w_up": ColwiseParallel(),
        "mlp.w_down": RowwiseParallel(output_layouts=stream,
                                      use_local_output=not sequence_parallel),
    }
    if sequence_parallel:
        plan["attn_norm"] = SequenceParallel()
        plan["mlp_norm"] = SequenceParallel()
    return plan
