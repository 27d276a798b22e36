"""The frozen teacher of knowledge distillation (engine/model/kd_loss.py): loaded in the training
job from a native checkpoint, in the training's compute precision, in eval mode and without
gradients; never seen by the optimizer or saved in checkpoints.

Teacher and student must share the tokenizer: the vocabulary sizes must match, and where both
sides record their tokenizer (the student's datasets through their tokenize manifests; the
teacher through the tokenizer folder `convert` writes beside a checkpoint, or else the
datasets its training spec names) the files must be the same.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from engine.checkpoint import store as ckpt
from engine.data.provenance import check_same_tokenizer
from engine.errors import InputError
from engine.formats import model_format
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel, local_shard
from engine.parallel.context_parallel import apply_context_parallel
from engine.parallel.data_parallel import apply_fsdp
from engine.parallel.layout import context_parallel_errors
from engine.parallel.mesh import Mesh
from engine.train.spec import TrainSpec

log = logging.getLogger(__name__)
OTHER_TOKENIZER = ("A teacher with another tokenizer can only supply synthetic data: synthesize "
                   "with it, then finetune on its text (CE alone)")


def load_teacher(spec: TrainSpec, student: ModelConfig, mesh: Mesh,
                 device: torch.device) -> LlamaModel:
    """The teacher's model from checkpoint `spec.distill.teacher`, frozen, in bf16 (fp32 if the
    training is), its blocks compiled and sharded as the student's under FSDP (whole on each
    rank otherwise: it has no gradients for DDP to reduce); InputError if it cannot be the
    student's teacher."""
    teacher, blend = spec.distill.teacher, spec.data.blend
    if model_format(Path(teacher)) == "hf":
        raise InputError(f"distill.teacher {teacher}: a Hugging Face model; convert it to a "
                         f"native checkpoint first (python -m engine convert)")
    path = ckpt.checkpoint_path(teacher)
    cfg = ModelConfig.model_validate(ckpt.read_model_config(path))
    if cfg.vocab_size != student.vocab_size:
        raise InputError(f"distill.teacher {path}: vocabulary of {cfg.vocab_size} tokens, the "
                         f"student's has {student.vocab_size}: teacher and student must share "
                         f"the tokenizer. {OTHER_TOKENIZER}")
    try:
        check_same_tokenizer(path, blend, f"distill.teacher {path}", "teacher", "student's data")
    except InputError as e:
        raise InputError(f"{e}. {OTHER_TOKENIZER}") from None
    errors = context_parallel_errors(cfg) if mesh.groups["cp"] is not None else []
    if errors:
        raise InputError(f"distill.teacher {path}: " + "; ".join(errors))
    dtype = torch.float32 if spec.precision == "fp32" else torch.bfloat16
    with torch.device("meta"):
        model = LlamaModel(cfg).to(dtype).requires_grad_(False)
    if mesh.groups["cp"] is not None:
        apply_context_parallel(model, mesh.groups["cp"], spec.data.seq_length)
    if spec.compile:
        for block in model.layers.values():
            block.compile()
    apply_fsdp([model], spec.data_parallel, mesh, spec.precision, forward_only=True)
    model.to_empty(device=device)
    ckpt.load_checkpoint(path, model, restore_rng=False)  # the stored fp32 read into `dtype`
    model.eval()
    log.info("teacher %s: %d parameters, %s, frozen; %d parameter bytes on this rank", path,
             sum(p.numel() for p in model.parameters()), dtype,
             sum(local_shard(p).untyped_storage().nbytes() for p in model.parameters()))
    return model
