"""A consolidated checkpoint: the whole model in one safetensors file, `model.safetensors`, for
tools that want one file rather than a sharded folder (an export, a single-GPU script).

Weights under their global names, fp32, as `LlamaModel.state_dict()` names them (and
model_config.json beside the file builds that model): `model.load_state_dict({k: v for k, v in
load_file(path).items() if not k.startswith("optim.")})`. With the optimizer state, its
tensors are there too, under DCP's names (`optim.state.<parameter>.<exp_avg|exp_avg_sq|step>`),
and its param groups (hyper-parameters and parameter names) in the file's metadata as JSON,
beside the model config and the training state (iteration, consumed samples, loss scaler);
`read_consolidated` gives the optimizer's state dict back in torch's full form. safetensors
runs no code when read, unlike a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict)

from engine.errors import InputError

FORMAT = "lmforge-consolidated-1"
OPTIM = "optim."


def gather(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
           ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The model's (and optimizer's) whole tensors, on the CPU of rank 0 (every rank must call
    it; the others get empty dicts)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None
    return weights, optim


def flat_tensors(weights: dict[str, torch.Tensor],
                 optim: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The file's tensors by name: weights, then the optimizer's per-parameter state."""
    out = dict(weights)
    for name, state in (optim or {}).get("state", {}).items():
        out.update({f"{OPTIM}state.{name}.{key}": value for key, value in state.items()})
    return out


def write_consolidated(path: Path, weights: dict[str, torch.Tensor],
                       optim: dict[str, Any] | None, model_config: dict[str, Any],
                       meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Write the file; returns what it holds, by name."""
    tensors, seen = {}, set()
    for name, value in flat_tensors(weights, optim).items():
        value = value.detach().contiguous()
        if value.data_ptr() in seen and value.numel():  # tied weights: safetensors stores each once
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[name] = value
    metadata = {"format": FORMAT, "model_config": json.dumps(model_config),
                "meta": json.dumps(meta, default=str)}
    if optim is not None:
        metadata[f"{OPTIM}param_groups"] = json.dumps(optim["param_groups"], default=str)
    save_file(tensors, str(path), metadata=metadata)
    return tensors


def read_consolidated(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None,
                                                 dict[str, str]]:
    """(weights, the optimizer state dict in torch's full form or None, the file's metadata)."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors' own error types differ between its versions
        raise InputError(f"{path}: not a readable safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise InputError(f"{path}: not a consolidated lmforge checkpoint (format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    weights = {k: v for k, v in tensors.items() if not k.startswith(OPTIM)}
    groups = metadata.get(f"{OPTIM}param_groups")
    if groups is None:
        return weights, None, metadata
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(f"{OPTIM}state."):
            param, _, key = name.removeprefix(f"{OPTIM}state.").rpartition(".")
            state.setdefault(param, {})[key] = value
    return weights, {"state": state, "param_groups": json.loads(groups)}, metadata
