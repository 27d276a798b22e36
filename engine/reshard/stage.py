"""reshard: a native checkpoint rewritten for another layout, or consolidated into one file.

The job's ranks build the model and its optimizer in the target layout exactly as training does
(engine.train.build: meta device, tensor parallel, FSDP, then materialised — each rank holds only
its shards), load the source into them with the checkpoint code training resumes with (global
names, so any layout loads any other), and save them with the code training saves with: the
output is a training checkpoint like any other, its meta.json naming the new layout and world
size and carrying the iteration, consumed samples and loss scaler, so `pretrain --load OUTPUT`
resumes in the new layout. Before the output is renamed into place, it is read back into the
model and compared with what was loaded, tensor by tensor (exact equality); a consolidated file
is read back and compared with what was gathered. A finished output with the same fingerprint
and world size is kept as it is; nothing is left at the output path on failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from engine.atomic import check_output_free, staged_dir
from engine.checkpoint.latest import LATEST
from engine.checkpoint.store import (checkpoint_path, load_checkpoint, read_meta,
                                     read_model_config, save_checkpoint)
from engine.errors import InputError, LmforgeError
from engine.formats import copy_tokenizer
from engine.lineage import stage_fingerprint
from engine.manifest import FileEntry, Manifest, complete, sha256_file, write_manifest
from engine.model.config import ModelConfig
from engine.parallel import distributed
from engine.parallel.layout import Layout, layout_for
from engine.parallel.mesh import build_mesh
from engine.reshard.consolidated import (flat_tensors, gather, read_consolidated,
                                         write_consolidated)
from engine.reshard.spec import CONSOLIDATED, Spec, input_paths
from engine.spec import format_validation_error
from engine.train.build import Built, build
from engine.train.spec import TrainSpec

log = logging.getLogger(__name__)
_FROM_SAVE = ("files", "iteration", "world_size", "has_optimizer")  # save_checkpoint writes these
# what a checkpoint that no training wrote (convert's) is built with: the build reads only the
# layout, the precision and the optimizer's settings of a training spec
_STAND_IN = {"data": {"blend": ["-"], "seq_length": 1}, "checkpoint": {"save": "-"},
             "iters": 1, "global_batch_size": 1, "precision": "fp32"}


class ReadBackError(LmforgeError):
    """The output, read back, does not hold what was loaded from the source."""


def run(spec: Spec) -> Manifest | None:
    """Rank 0 returns the manifest, the other ranks None."""
    owns_group = not dist.is_initialized()
    env = distributed.setup(spec.device)
    try:
        return _reshard(spec, env)
    finally:
        if owns_group:
            distributed.teardown()


def _reshard(spec: Spec, env: distributed.Env) -> Manifest | None:
    started = time.perf_counter()
    out = Path(spec.output)
    source = checkpoint_path(spec.input)
    fp, inputs = distributed.on_main(
        lambda: stage_fingerprint("reshard", spec, input_paths(spec)))
    done = distributed.on_main(lambda: _finished(out, fp, env.world_size))
    if done is not None:
        log.info("reshard already finished: %s holds it (fingerprint %s); nothing to do", out,
                 fp[:16])
        return done if env.is_main else None
    distributed.on_main(lambda: check_output_free(out))
    meta = read_meta(source)
    cfg = ModelConfig.model_validate(read_model_config(source))
    if spec.optimizer and not meta.get("has_optimizer"):
        raise InputError(f"{source}: holds no optimizer state (weights only): pass "
                         f"--no-optimizer (optimizer: false)")
    recorded, build_spec = _training_specs(meta, cfg, spec)
    try:
        layout = spec.layout(env.world_size)
    except ValueError as exc:
        raise InputError(f"reshard on {env.world_size} rank(s): {exc}") from None
    _warn_if_batch_does_not_divide(recorded, env.world_size)
    source_layout = _source_layout(meta)
    log.info("reshard %s (iteration %s, %s rank(s): %s) -> %s (%s rank(s): %s, %s, %s)",
             source, meta.get("iteration"), meta.get("world_size"),
             Layout(**source_layout).describe() if source_layout else "layout unknown",
             out, env.world_size, layout.describe(),
             "with optimizer state" if spec.optimizer else "weights only",
             "one consolidated file" if spec.consolidate else "sharded")

    built = build(cfg, build_spec, build_mesh(layout, env.device), env.device)
    optimizer = built.optimizer if spec.optimizer else None
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    load_checkpoint(source, built.model, optimizer)
    seconds["load"] = time.perf_counter() - clock
    log.info("loaded %s in %.1f s", source, seconds["load"])

    carried = {k: v for k, v in meta.items() if k not in _FROM_SAVE}
    out_meta = {**carried, **({"spec": recorded.model_dump(mode="json")} if recorded else {}),
                "layout": asdict(layout),
                "resharded_from": {"path": str(source), "iteration": meta.get("iteration"),
                                   "world_size": meta.get("world_size"),
                                   "layout": source_layout}}
    with _staged(out, env) as tmp:
        write = _write_consolidated if spec.consolidate else _write_sharded
        files, verified = write(tmp, built, optimizer, out_meta, cfg, int(meta["iteration"]),
                                env, seconds)

        def finish() -> Manifest:
            files.update({str(p.relative_to(tmp)): sha256_file(p)
                          for p in copy_tokenizer(source, tmp)})
            seconds["total"] = time.perf_counter() - started
            summary = {"format": "consolidated" if spec.consolidate else "sharded",
                       "iteration": int(meta["iteration"]), "parameters": built.parameters,
                       "optimizer": spec.optimizer, "world_size": env.world_size,
                       "layout": layout.describe(),
                       "source": {"path": str(source), "world_size": meta.get("world_size"),
                                  "layout": source_layout,
                                  "bytes": sum(e["bytes"] for e in meta["files"].values())},
                       "bytes": sum(entry.bytes for entry in files.values()),
                       "tensors_verified": verified,
                       "seconds": {k: round(v, 3) for k, v in seconds.items()}}
            manifest = Manifest(kind="checkpoint", stage="reshard", inputs=inputs,
                                spec=spec.model_dump(mode="json"), fingerprint=fp,
                                summary=summary, files=files)
            write_manifest(tmp, manifest)
            return manifest

        manifest = distributed.on_main(finish)
    distributed.barrier()  # no rank returns before rank 0 has renamed the output into place
    log.info("resharded %s -> %s: %d bytes, %d tensors verified equal, %.1f s", source, out,
             manifest.summary["bytes"], verified, manifest.summary["seconds"]["total"])
    return manifest if env.is_main else None


def _warn_if_batch_does_not_divide(recorded: TrainSpec | None, world_size: int) -> None:
    """The output's training spec, resumed as it is on these ranks, would be refused: say so
    now (a resume sets its own batch sizes, so this is no error)."""
    try:
        if recorded is not None:
            recorded.check_world(world_size)
    except ValueError as exc:
        log.warning("resuming with the recorded training spec on %d rank(s) needs other batch "
                    "sizes: %s", world_size, exc)


def _training_specs(meta: dict[str, Any], cfg: ModelConfig,
                   spec: Spec) -> tuple[TrainSpec | None, TrainSpec]:
    """(the training spec the output records — the source's, laid out as the target — or None
    when the source has none; the spec the model is built with). bf16-master needs a whole model
    per DDP rank: in other layouts it is recorded as bf16, the same fp32 weights and moments in a
    checkpoint. The build holds fp32 weights in the model (bf16 for bf16-master: torch's AdamW,
    whose checkpoints MasterAdamW's equal), with neither recompute nor compile: nothing runs."""
    source = meta.get("spec")
    fields = {**(source or _STAND_IN), "model": cfg.model_dump(mode="json"),
              "tensor_parallel": spec.tensor_parallel,
              "pipeline_parallel": spec.pipeline_parallel, "data_parallel": spec.data_parallel,
              "data_parallel_replicate": spec.data_parallel_replicate}
    whole_model = (spec.data_parallel == "ddp"
                   and spec.tensor_parallel == spec.pipeline_parallel == 1)
    if fields.get("precision") == "bf16-master" and not whole_model:
        fields["precision"] = "bf16"
    try:
        recorded = TrainSpec.model_validate(fields)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc, f"{spec.input}: meta.json spec")) from None
    precision = "bf16" if recorded.precision == "bf16-master" else recorded.precision
    build_spec = recorded.model_copy(update={"precision": precision, "recompute": "none",
                                             "compile": False})
    return (recorded if source is not None else None), build_spec


def _source_layout(meta: dict[str, Any]) -> dict[str, int] | None:
    """The source's layout: as its meta.json records it (a reshard's), or as its training spec
    laid out its world size."""
    if meta.get("layout"):
        return meta["layout"]
    spec, world = meta.get("spec") or {}, meta.get("world_size", 1)
    try:
        return asdict(layout_for(world, spec.get("tensor_parallel", 1),
                                 spec.get("pipeline_parallel", 1),
                                 spec.get("data_parallel", "ddp"),
                                 spec.get("data_parallel_replicate", 1)))
    except ValueError:
        return None


def _write_sharded(tmp: Path, built: Built, optimizer, meta: dict[str, Any], cfg: ModelConfig,
                   iteration: int, env: distributed.Env, seconds: dict[str, float]):
    """A training checkpoint under `tmp`, read back into the model and compared with what it
    held; (its files, tensors compared)."""
    before = _local_state(built.model, optimizer)
    clock = time.perf_counter()
    final = save_checkpoint(tmp, iteration, built.model, optimizer, meta,
                            cfg.model_dump(mode="json"))
    seconds["save"] = time.perf_counter() - clock
    log.info("saved %s in %.1f s; reading it back", final, seconds["save"])
    clock = time.perf_counter()
    load_checkpoint(final, built.model, optimizer)
    after = _local_state(built.model, optimizer)
    differ = [name for name in before if not torch.equal(before[name], after[name])]
    differ += [name for name in after if name not in before]
    count = torch.tensor([len(differ), len(before)], dtype=torch.float64, device=env.device)
    distributed.all_reduce_sum(count)
    seconds["verify"] = time.perf_counter() - clock
    if count[0]:
        raise ReadBackError(f"{final}: read back, {int(count[0])} tensor(s) differ from what "
                            f"was loaded (first here: {differ[:3]}); nothing was written")
    verified = int(count[1])
    if not env.is_main:
        return {}, verified
    written = read_meta(final)["files"]
    files = {f"{final.name}/{name}": FileEntry.model_validate(entry)
             for name, entry in written.items()}
    files[f"{final.name}/meta.json"] = sha256_file(final / "meta.json")
    files[LATEST] = sha256_file(tmp / LATEST)
    return files, verified


def _local_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Copies of this rank's shards of every model and optimizer tensor, by name, and the
    optimizer's hyper-parameters as tensors of their repr (compared alike)."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        optim = get_optimizer_state_dict(model, optimizer)
        state["optim"] = optim["state"]
        state["groups"] = {str(i): torch.frombuffer(bytearray(repr(sorted(g.items())).encode()),
                                                    dtype=torch.uint8)
                           for i, g in enumerate(optim["param_groups"])}
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            out[prefix] = local.detach().to("cpu", copy=True)

    walk("", state)
    return out


def _write_consolidated(tmp: Path, built: Built, optimizer, meta: dict[str, Any],
                        cfg: ModelConfig, iteration: int, env: distributed.Env,
                        seconds: dict[str, float]):
    """model.safetensors and model_config.json under `tmp`, the file read back and compared
    with what was gathered; (their files, tensors compared) on rank 0."""
    clock = time.perf_counter()
    weights, optim = gather(built.model, optimizer)
    model_config = cfg.model_dump(mode="json")
    file_meta = {**meta, "iteration": iteration, "has_optimizer": optimizer is not None}

    def write() -> int:
        written = write_consolidated(tmp / CONSOLIDATED, weights, optim, model_config, file_meta)
        seconds["save"] = time.perf_counter() - clock
        log.info("wrote %s (%d tensors) in %.1f s; reading it back", tmp / CONSOLIDATED,
                 len(written), seconds["save"])
        again = time.perf_counter()
        weights_read, optim_read, _ = read_consolidated(tmp / CONSOLIDATED)
        read = flat_tensors(weights_read, optim_read)
        differ = sorted(set(written) ^ set(read)) + [
            name for name in written if name in read and not torch.equal(written[name], read[name])]
        seconds["verify"] = time.perf_counter() - again
        if differ:
            raise ReadBackError(f"{tmp / CONSOLIDATED}: read back, {len(differ)} tensor(s) "
                                f"differ from what was gathered (first: {differ[:3]}); nothing "
                                f"was written")
        (tmp / "model_config.json").write_text(json.dumps(model_config, indent=2),
                                               encoding="utf-8")
        return len(written)

    verified = distributed.on_main(write)
    if not env.is_main:
        return {}, verified
    files = {name: sha256_file(tmp / name) for name in (CONSOLIDATED, "model_config.json")}
    return files, verified


def _finished(out: Path, fingerprint: str, world_size: int) -> Manifest | None:
    """The manifest of this very reshard, already finished at `out` (a repeated or requeued
    command), or None when `out` holds nothing complete; an error when it holds another."""
    manifest = complete(out)
    if manifest is None:
        return None
    if manifest.fingerprint != fingerprint or manifest.summary.get("world_size") != world_size:
        raise InputError(f"{out}: holds another {manifest.stage} output (fingerprint "
                         f"{manifest.fingerprint[:16]}, {manifest.summary.get('world_size')} "
                         f"rank(s)); choose another output folder")
    return manifest


@contextlib.contextmanager
def _staged(out: Path, env: distributed.Env) -> Iterator[Path]:
    """engine.atomic.staged_dir held by rank 0, its temporary folder shared with every rank."""
    with staged_dir(out) if env.is_main else contextlib.nullcontext() as tmp:
        yield Path(distributed.broadcast_object(str(tmp) if env.is_main else None))
        distributed.barrier()  # every rank's files are written before rank 0 renames the folder
