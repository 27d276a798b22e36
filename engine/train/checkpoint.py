"""Native checkpoints (DESIGN.md §4): Megatron-style folders written with
torch.distributed.checkpoint, so any data/tensor/pipeline layout can load any other.

    <dir>/latest_checkpointed_iteration.txt
    <dir>/iter_0000100/  .metadata, __*.distcp   model (+ optimizer) state, sharded per rank
                         model_config.json       the architecture, for loaders that build the model
                         meta.json               iteration, consumed samples, spec, world size
                         rng/rank_00000.pt        each rank's RNG state (restored when ranks match)

A checkpoint is written into `iter_N.tmp` by every rank, then renamed by rank 0 after a barrier,
and only then named in latest_checkpointed_iteration.txt: a crash at any point leaves the previous
checkpoint as the latest complete one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from engine.atomic import atomic_write_text
from engine.errors import InputError
from engine.train.latest import LATEST, latest_iteration  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def iter_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_path(root: str | Path, iteration: int | None = None) -> Path:
    """The folder of a complete checkpoint: `root` itself if it is an iter_* folder, else the
    requested or latest iteration under `root`; a clear error otherwise."""
    root = Path(root)
    if (root / "meta.json").is_file():
        return root
    if not root.is_dir():
        raise InputError(f"{root}: no such checkpoint folder")
    iteration = latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        raise InputError(f"{root}: not a checkpoint (no {LATEST} and no meta.json)")
    path = iter_dir(root, iteration)
    if not (path / "meta.json").is_file():
        raise InputError(f"{path}: checkpoint named in {LATEST} is missing or incomplete")
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


def read_model_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "model_config.json"
    if not file.is_file():
        raise InputError(f"{path}: checkpoint has no model_config.json")
    return json.loads(file.read_text())


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: str | Path, iteration: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, meta: dict[str, Any],
                    model_config: dict[str, Any], keep_last: int | None = None) -> Path:
    root = Path(root)
    final = iter_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():  # single-process saves are intended, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        atomic_write_text(tmp / "model_config.json", json.dumps(model_config, indent=2))
        atomic_write_text(tmp / "meta.json", json.dumps(
            {**meta, "iteration": iteration, "world_size": _world(),
             "has_optimizer": optimizer is not None}, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(root / LATEST, f"{iteration}\n")
        if keep_last:
            _prune(root, keep_last)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and (p / "meta.json").is_file()
                  and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint folder (see checkpoint_path) into `model` (and `optimizer`); returns meta.
    RNG states are restored only when the world size is unchanged."""
    path = Path(path)
    meta = read_meta(path)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise InputError(f"{path}: checkpoint holds no optimizer state")
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        reason = [line for line in str(exc).splitlines() if line.strip()][-1]
        raise InputError(f"{path}: checkpoint does not fit the model: {reason}") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if restore_rng and meta.get("world_size") == _world() and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return meta
