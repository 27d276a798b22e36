"""megatron-core's `torch_dist` checkpoints (Megatron-LM `--ckpt-format torch_dist`), read and
written with torch.distributed.checkpoint directly: megatron-core is not needed at run time.

    <root>/latest_checkpointed_iteration.txt, <root>/iter_N/ (or release/):
      .metadata, __*_*.distcp   the tensors, in global coordinates whatever the TP/PP layout
      common.pt                 what is not sharded: args, iteration, checkpoint_version
      metadata.json             {"sharded_backend": "torch_dist", ...}

Keys are megatron-core names with the layer number dropped: `decoder.layers.<name>` holds every
layer stacked on a leading axis. The norms are stored under Transformer Engine's names whichever
spec the model was built with. Linears' `_extra_state` are pickled objects (`<key>/shard_L_N`):
skipped on read (the metadata is read with the allow-list unpickler), written as `[None]`
(the local spec's state, in the list megatron-core wraps each object in)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from engine.checkpoint.latest import LATEST
from engine.checkpoint.safe_load import SafePlanner, SafeReader
from engine.convert import megatron_names as names
from engine.convert.megatron import (CHECKPOINT_VERSION, RELEASE, build_model, iteration_dir,
                                     real_vocab)
from engine.convert.megatron_args import args_from_config, config_from_args
from engine.convert.megatron_layout import check_layout, padded_vocab
from engine.convert.megatron_pickle import args_of, load_pickled
from engine.convert.megatron_tensors import Parts, to_parts
from engine.errors import InputError
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel

COMMON, METADATA = "common.pt", "metadata.json"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, whole, as stored."""
    reader = SafeReader(folder)
    metadata = reader.read_metadata()
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if isinstance(meta, TensorStorageMetadata)}
    dcp.load(state, storage_reader=SafeReader(folder), planner=SafePlanner(), no_dist=True)
    return state


def _parts(tensors: dict[str, torch.Tensor], folder: Path) -> Parts:
    parts: Parts = {}
    unknown = []
    for key, tensor in tensors.items():
        if not names.is_weight(key):
            continue
        try:
            stacked, part = names.parse_stacked(key)
        except KeyError as exc:
            unknown.append(exc.args[0])
            continue
        if stacked:
            parts.update({(layer, part): t.float() for layer, t in enumerate(tensor)})
        else:
            parts[None, part] = tensor.float()
    if unknown:
        raise InputError(f"{folder}: tensors of no known megatron-core name: "
                         f"{', '.join(unknown[:5])}")
    return parts


def load_mcore_dist(path: Path, vocab_size: int | None = None,
                    tokenizer: Path | None = None) -> tuple[ModelConfig, LlamaModel, str]:
    """(config, model in fp32, dtype the weights are stored in)."""
    folder = iteration_dir(path)
    marker = folder / METADATA
    if not marker.is_file():
        raise InputError(f"{folder}: not a torch_dist checkpoint (no {METADATA})")
    backend = json.loads(marker.read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise InputError(f"{marker}: sharded_backend {backend!r}, only 'torch_dist' is read")
    args = args_of(load_pickled(folder / COMMON), folder / COMMON)
    tensors = read_tensors(folder)
    parts = _parts(tensors, folder)
    if (None, "embed") not in parts:
        raise InputError(f"{folder}: no embedding.word_embeddings.weight")
    vocab = real_vocab(args, vocab_size, tokenizer, parts[None, "embed"].shape[0])
    cfg = config_from_args(args, vocab, str(folder))
    dtypes = {t.dtype for t in tensors.values()}
    stored = next((n for n, d in (("bf16", torch.bfloat16), ("fp16", torch.float16))
                   if dtypes == {d}), "fp32")
    return cfg, build_model(cfg, parts, False, str(folder)), stored


def write_mcore_dist(root: Path, model: LlamaModel, tensor_parallel: int, pipeline_parallel: int,
                     divisible_by: int, dtype: str) -> list[str]:
    """root/latest_checkpointed_iteration.txt ("release") + release/ as megatron-core writes it;
    the args name the TP x PP a Megatron-LM run would load it into (torch_dist reshards)."""
    cfg = model.cfg
    check_layout(cfg, tensor_parallel, pipeline_parallel)
    padded = padded_vocab(cfg.vocab_size, divisible_by, tensor_parallel)
    args = args_from_config(cfg, tensor_parallel, pipeline_parallel, divisible_by, padded, dtype,
                            "te", "torch_dist")
    cast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    parts = to_parts({n: t.detach().to(cast) for n, t in model.state_dict().items()}, cfg, padded)
    state: dict[str, object] = {}
    for (layer, part), tensor in parts.items():
        if layer is None:
            state[names.top_name(part)] = tensor
        elif layer == 0:
            state[names.layer_name(None, part, "te")] = torch.stack(
                [parts[i, part] for i in range(cfg.num_layers)])
    layers = cfg.num_layers
    for linear in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                   "mlp.linear_fc2"):
        for i in range(layers):
            state[f"decoder.layers.{linear}._extra_state/shard_{i}_{layers}"] = [None]
    state["output_layer._extra_state/shard_0_1"] = [None]
    folder = root / RELEASE
    folder.mkdir()
    # unflattened: megatron-core keys each object by its own name, holding [object]
    dcp.save(state, storage_writer=FileSystemWriter(folder), no_dist=True,
             planner=DefaultSavePlanner(flatten_state_dict=False))
    torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0},
               folder / COMMON)
    (folder / METADATA).write_text(json.dumps(BACKEND))
    (root / LATEST).write_text(RELEASE)
    return sorted(str(p.relative_to(root)) for p in folder.iterdir())


