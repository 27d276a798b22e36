"""Native checkpoints (DESIGN.md §4): Megatron-style folders written with
torch.distributed.checkpoint, so any data/tensor/pipeline layout can load any other.

    <dir>/latest_checkpointed_iteration.txt
    <dir>/iter_0000100/  .metadata, __*.distcp   model (+ optimizer) state, sharded per rank
                         rng/rank_00000.pt        each rank's RNG state (restored when ranks match)
                         model_config.json       the architecture, for loaders that build the model
                         meta.json               iteration, consumed samples, spec, world size and
                                                 every other file's size and sha256; written last

The save protocol: every rank writes into `iter_N.tmp` and hashes the files it wrote; rank 0
writes meta.json last, renames the folder to `iter_N`, and only then names it in
latest_checkpointed_iteration.txt. A checkpoint is complete when its meta.json is there and every
file it lists has its recorded size; loading also checks the sha256s. A complete checkpoint is
never removed to make room for its replacement: saving an iteration that already has one keeps
it (exact resume makes both the same state). Old checkpoints are renamed `iter_N.removing` before
they are deleted, so a kill midway never leaves a folder that looks complete. Whatever a killed
save or prune left is swept at the next save. A reader whose latest file names a checkpoint that
is not complete falls back to the newest complete one before it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from engine.atomic import atomic_write_text, fsync_dir, out_of_space
from engine.checkpoint.latest import LATEST, latest_iteration
from engine.checkpoint.safe_load import SafePlanner, SafeReader, rng_state, set_rng_state
from engine.errors import InputError
from engine.manifest import HASH_THREADS, FileEntry, check_files, sha256_file, sha256_files

log = logging.getLogger(__name__)
_NAME = re.compile(r"iter_(\d{7,})")
_LATER = ("meta.json", "model_config.json")  # written by rank 0 after the shards are hashed
# optimizer state keyed by parameter name ("state.layers.3.attn.wq.weight.exp_avg", and its
# param-group settings likewise), not by position in a rank's parameter list: a pipeline rank
# holds only its stages' parameters, and another layout must find each one by name
_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


def iter_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "meta.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise InputError(f"{file}: missing: not a complete checkpoint") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{file}: not valid JSON: {exc}") from None


def _files(path: Path, meta: dict[str, Any]) -> dict[str, FileEntry]:
    if "files" not in meta:
        raise InputError(f"{path / 'meta.json'}: lists no file checksums (written by an older "
                         f"lmforge): not a complete checkpoint")
    return {name: FileEntry.model_validate(entry) for name, entry in meta["files"].items()}


def check_complete(path: str | Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint folder, or an InputError saying what is missing."""
    path = Path(path)
    meta = read_meta(path)
    check_files(path, _files(path, meta), checksums=False)
    return meta


def is_complete(path: str | Path) -> bool:
    try:
        check_complete(path)
    except InputError:
        return False
    return True


def complete_iterations(root: str | Path) -> list[int]:
    root = Path(root)
    found = (_NAME.fullmatch(p.name) for p in root.iterdir()) if root.is_dir() else ()
    return sorted(int(m.group(1)) for m in found if m and is_complete(root / m.group(0)))


def checkpoint_path(root: str | Path, iteration: int | None = None) -> Path:
    """The folder of a complete checkpoint: `root` itself if it is an iter_* folder, else the
    requested or latest iteration under `root`; a clear error otherwise."""
    root = Path(root)
    if (root / "meta.json").is_file():
        check_complete(root)
        return root
    if not root.is_dir():
        raise InputError(f"{root}: no such checkpoint folder")
    named = latest_iteration(root) if iteration is None else iteration
    if named is None:
        raise InputError(f"{root}: not a checkpoint (no {LATEST} and no meta.json)")
    path = iter_dir(root, named)
    try:
        check_complete(path)
        return path
    except InputError as exc:
        older = [i for i in complete_iterations(root) if i < named]
        if iteration is not None or not older:
            raise InputError(f"{path}: the checkpoint named in {root / LATEST} is not complete "
                             f"({exc}) and no older complete checkpoint is there") from None
        log.warning("%s is not complete (%s); using %s, the newest complete one before it",
                    path, exc, iter_dir(root, older[-1]))
        return iter_dir(root, older[-1])


def read_model_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "model_config.json"
    if not file.is_file():
        raise InputError(f"{path}: checkpoint has no model_config.json")
    return json.loads(file.read_text())


def save_checkpoint(root: str | Path, iteration: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, meta: dict[str, Any],
                    model_config: dict[str, Any], keep_last: int | None = None) -> Path:
    """Save `model` (this rank's part of it under the model's parameter names: a pipeline rank
    passes its stages as one module, engine/parallel/pipeline.py's LocalStages) and
    `optimizer`; every rank calls it."""
    root = Path(root)
    final = iter_dir(root, iteration)
    if is_complete(final):
        if _rank() == 0:
            _point_latest(root, iteration)
            if keep_last:
                _prune(root, keep_last)
            log.info("checkpoint %s is already complete: kept", final)
        _barrier()
        return final
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    try:
        files = _write_shards(tmp, model, optimizer)
        if _rank() == 0:
            _commit(root, tmp, final, files, {**meta, "iteration": iteration, "world_size": _world(),
                                              "has_optimizer": optimizer is not None}, model_config)
            if keep_last:
                _prune(root, keep_last)
            log.info("saved checkpoint %s", final)
    except BaseException as exc:
        # a full disk under dcp.save is a CheckpointException, which is no Exception
        full = out_of_space(exc, root) if isinstance(exc, (Exception, CheckpointException)) \
            else None
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise full from exc
        raise
    _barrier()
    return final


def _write_shards(tmp: Path, model, optimizer) -> dict[str, FileEntry]:
    """Every rank writes its shards and RNG state and hashes them; rank 0 gets all hashes."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=_OPTIM)
    with warnings.catch_warnings():  # single-process saves are intended, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        # a rank's shards in several files: written and then hashed by several threads
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), thread_count=HASH_THREADS))
    torch.save(rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
    mine = _hash([p for p in tmp.rglob("*") if p.is_file() and _written_by(p.name, _rank())], tmp)
    _barrier()  # every rank's files are on disk before rank 0 hashes the rest
    files = {name: entry for part in _all_gather(mine) for name, entry in part.items()}
    if _rank() == 0:
        files.update(_hash([p for p in tmp.rglob("*")
                            if p.is_file() and str(p.relative_to(tmp)) not in files], tmp))
    return files


def _hash(paths: list[Path], root: Path) -> dict[str, FileEntry]:
    paths = sorted(paths)
    return {str(p.relative_to(root)): entry for p, entry in zip(paths, sha256_files(paths))}


def _written_by(name: str, rank: int) -> bool:
    return name.startswith(f"__{rank}_") or name == f"rank_{rank:05d}.pt"


def _commit(root: Path, tmp: Path, final: Path, files: dict[str, FileEntry],
            meta: dict[str, Any], model_config: dict[str, Any]) -> None:
    atomic_write_text(tmp / "model_config.json", json.dumps(model_config, indent=2))
    files["model_config.json"] = sha256_file(tmp / "model_config.json")
    atomic_write_text(tmp / "meta.json", json.dumps(
        {**meta, "files": {k: v.model_dump() for k, v in sorted(files.items())}},
        indent=2, default=str))
    if final.exists():  # not complete (it was checked): a leftover of damage from before
        _remove(final)
    os.replace(tmp, final)
    fsync_dir(root)
    _point_latest(root, int(meta["iteration"]))


def _point_latest(root: Path, iteration: int) -> None:
    atomic_write_text(root / LATEST, f"{iteration}\n")
    fsync_dir(root)


def _rename_aside(path: Path, suffix: str) -> Path:
    aside = path.with_name(path.name + suffix)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    return aside


def _remove(path: Path) -> None:
    """Rename first: a folder half deleted never keeps the name of a checkpoint."""
    shutil.rmtree(_rename_aside(path, ".removing"))


def _partial(path: Path) -> bool:
    """Left by a killed save or prune: no meta.json, or files it lists are missing. A folder of
    an older format (meta.json without checksums) is not touched."""
    try:
        meta = read_meta(path)
        if "files" in meta:
            check_files(path, _files(path, meta), checksums=False)
    except InputError:
        return True
    return False


def _sweep(root: Path) -> None:
    for path in root.glob("iter_*"):
        leftover = path.name.endswith((".tmp", ".removing"))
        if leftover or (_NAME.fullmatch(path.name) and path.is_dir() and _partial(path)):
            log.warning("removing %s, left by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)


def _prune(root: Path, keep_last: int) -> None:
    for iteration in complete_iterations(root)[:-keep_last]:
        _remove(iter_dir(root, iteration))


def set_aside_from(root: str | Path, iteration: int) -> Path | None:
    """After training diverged at `iteration`: checkpoints from it on hold weights whose loss was
    not finite. Rename them `iter_N.nonfinite` (kept for inspection, never loaded), point the
    latest file at the newest remaining one and return it (None: none is left)."""
    root = Path(root)
    for it in complete_iterations(root):
        if it >= iteration:
            aside = _rename_aside(iter_dir(root, it), ".nonfinite")
            log.warning("moved %s aside as %s: its weights give a non-finite loss",
                        iter_dir(root, it), aside.name)
    remaining = complete_iterations(root)
    if not remaining:
        (root / LATEST).unlink(missing_ok=True)
        return None
    _point_latest(root, remaining[-1])
    return iter_dir(root, remaining[-1])


def _verify(path: Path, meta: dict[str, Any]) -> None:
    """Every file's sha256, the files spread over the ranks; all ranks raise the same error."""
    files = sorted(_files(path, meta).items())
    try:
        check_files(path, dict(files[_rank()::_world()]))
        error = None
    except InputError as exc:
        error = str(exc)
    errors = [e for e in _all_gather(error) if e]
    if errors:
        raise InputError(errors[0])


# how the optimizer runs, not what it computes: the built optimizer's choice, whatever the writer's
_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def _stored_hyperparameters(optim: dict[str, Any], stored: set[str]) -> dict[str, Any]:
    """Take out of `optim` (flattened: `param_groups.<parameter>.<key>` entries) the
    hyper-parameters not to read from the checkpoint and return them, the built optimizer's
    values. A checkpoint written by another optimizer class (MasterAdamW under DDP, torch's AdamW
    under TP or FSDP) lacks the class's own flags (AdamW's amsgrad, ...), and one written on
    another device has other implementation flags: neither may stop a resume in another layout."""
    return {key: optim.pop(key) for key in [k for k in optim if k.startswith("param_groups.")]
            if key.rsplit(".", 1)[1] in _IMPLEMENTATION or f"optim.{key}" not in stored}


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint folder (see checkpoint_path) into `model` (and `optimizer`) after
    checking every file's checksum; returns meta. RNG states are restored only when the world
    size is unchanged."""
    path = Path(path)
    meta = check_complete(path)
    _verify(path, meta)
    # read here: a refusal is clearer than wrapped by dcp.load
    stored = set(SafeReader(str(path)).read_metadata().state_dict_metadata)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise InputError(f"{path}: checkpoint holds no optimizer state (weights only): "
                             f"resume needs one written with it; finetune starts from the "
                             f"weights with a fresh optimizer")
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=_OPTIM)
        built = _stored_hyperparameters(state["optim"], stored)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner())
    except InputError:
        raise
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        if "Weights only load failed" in str(exc):
            raise InputError(f"{path}: refused: a shard holds more than tensors and plain "
                             f"data") from None
        reason = [line for line in str(exc).splitlines() if line.strip()][-1]
        raise InputError(f"{path}: checkpoint does not fit the model: {reason}") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if optimizer is not None:
        state["optim"].update(built)
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_OPTIM)
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if restore_rng and meta.get("world_size") == _world() and rng_file.is_file():
        try:
            state = torch.load(rng_file, weights_only=True)
        except pickle.UnpicklingError:
            raise InputError(f"{rng_file}: refused: it holds more than tensors and plain "
                             f"data") from None
        set_rng_state(state)
    return meta
