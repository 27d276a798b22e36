"""Hugging Face model folders: `config.json` plus safetensors (one file, or shards with
`model.safetensors.index.json`) or legacy `pytorch_model*.bin`. Written as `save_pretrained` writes
them, so transformers and vLLM load the result unchanged."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.errors import InputError
from engine.formats import CONFIG
from engine.manifest import verify_artifact
from engine.model.config import ModelConfig
from engine.model.hf_names import load_hf_state_dict, to_hf_state_dict
from engine.model.llama import LlamaModel

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


T = TypeVar("T")
# What reading a damaged file raises: JSON and UTF-8 errors (ValueError), safetensors' header
# checks, torch.load's zip reader (RuntimeError) and its weights-only unpickler.
_UNREADABLE = (ValueError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError)


def read_input(path: Path, read: Callable[[Path], T], what: str) -> T:
    """`read(path)`, where a file that cannot be read or decoded (unreadable, truncated, garbled)
    is an InputError naming it: the one error path for every file of a model folder."""
    try:
        return read(path)
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except _UNREADABLE as exc:
        raise InputError(f"{path}: not {what}: {str(exc).splitlines()[0]}") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """config.json, a shard index, generation_config.json: a JSON object."""
    data = read_input(path, lambda p: json.loads(p.read_bytes()), "valid JSON")
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object")
    return data


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        return read_input(file, load_file, "a valid safetensors file (truncated or corrupt)")
    # weights_only: a .bin is a pickle, never run code from it
    return read_input(file, lambda p: torch.load(p, map_location="cpu", weights_only=True,
                                                 mmap=True),
                      "a loadable PyTorch weights file (truncated or corrupt)")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise InputError(f"{folder}: not an HF model folder (no {CONFIG})")
    hf = read_json_object(path)
    if hf.get("quantization_config"):
        raise InputError(f"{path}: quantized checkpoints are not supported")
    return hf


def weight_files(folder: Path) -> tuple[Path, list[Path]]:
    """(the file that says which tensors there are: the shard index or the single weights file,
    the files holding them), preferring safetensors, as transformers does."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(f"{index}: no weight_map")
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InputError(f"{index}: lists shards that are missing: {', '.join(missing)}")
            return index, files
    for name in (SAFE, BIN):
        if (folder / name).is_file():
            return folder / name, [folder / name]
    raise InputError(f"{folder}: no weights ({SAFE}, {SAFE_INDEX}, {BIN} or {BIN_INDEX})")


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        part = _read_weights(file)
        twice = sorted(state.keys() & part.keys())
        if twice:
            raise InputError(f"{file}: tensors also stored in another shard: {twice[:5]}")
        state.update(part)
    return state


def load_hf(folder: Path) -> tuple[ModelConfig, dict[str, Any], LlamaModel, str]:
    """(config, raw config.json, model in fp32 on the CPU, the dtype most weights are stored in).
    A folder lmforge exported is checked against its manifest's checksums first, so a flipped
    bit is reported before anything is computed from it."""
    verify_artifact(folder)
    hf = read_config(folder)
    try:
        cfg = ModelConfig.from_hf(hf)
    except ValueError as exc:  # InputError included
        raise InputError(f"{folder / CONFIG}: {exc}") from None
    listing, files = weight_files(folder)
    state = _read_tensors(files)
    odd = [f"{name} ({t.dtype})" for name, t in state.items() if not t.is_floating_point()]
    if odd:
        raise InputError(f"{listing}: non-float tensors (quantized weights are not supported): "
                         f"{', '.join(odd[:5])}")
    with torch.device("meta"):
        model = LlamaModel(cfg)
    try:  # assigned as stored (no copy), then cast once: peak memory is stored + fp32
        load_hf_state_dict(model, state)
    except InputError as exc:
        raise InputError(f"{listing}: {exc}") from None
    by_dtype = Counter()
    for tensor in state.values():
        by_dtype[tensor.dtype] += tensor.numel()
    stored = next((n for n, d in DTYPES.items() if d == by_dtype.most_common(1)[0][0]), "fp32")
    return cfg, hf, model.float().eval(), stored


def export_state_dict(model: LlamaModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The HF-named tensors to write, cast to `dtype`. (Tests replace this to tamper a weight.)"""
    out = {}
    for name, tensor in to_hf_state_dict(model).items():
        cast = tensor.detach().to(dtype).contiguous()
        if not torch.isfinite(cast).all() and torch.isfinite(tensor).all():
            raise InputError(f"{name}: values overflow {dtype} (max |w| "
                             f"{tensor.abs().max().item():.4g}); choose another --dtype")
        out[name] = cast
    return out


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """In order, a new shard whenever the next tensor would overflow the current one (a tensor
    larger than the limit gets a shard of its own), as save_pretrained splits."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_hf(folder: Path, model: LlamaModel, dtype: str, max_shard_bytes: int,
             extra_config: dict[str, Any]) -> list[str]:
    """config.json + safetensors (sharded with an index when over `max_shard_bytes`); returns
    the weight files written."""
    state = export_state_dict(model, DTYPES[dtype])
    config = {**model.cfg.to_hf(), **extra_config, "torch_dtype": _HF_DTYPE_NAMES[dtype]}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    shards = _shards(state, max_shard_bytes)
    names = ([SAFE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for name, shard in zip(names, shards):
        save_file(shard, folder / name, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in state.values())},
                 "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names
