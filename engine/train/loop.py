"""The training loop shared by pretrain and finetune.

Each optimizer step consumes one global batch: samples [it·G, (it+1)·G) of the train split, rank r
taking micro-batches (a·W + r)·m … +m for accumulation step a. The loss is the sum of token losses
over the global batch divided by its number of loss tokens, so 1 rank and W ranks compute the same
step. The data position is a function of the iteration, which makes resume exact: model,
optimizer, iteration and RNG come back from the checkpoint and nothing else is needed.

One small all-reduce and host read per step carries two flags to every rank at once: "the
step is not finite" (skip it) and "a stop signal arrived" (save and exit). Stop signals are held
from start-up to the end of the final save: one during start-up stops before the first step, one
during a save lets it finish.

Non-finite steps, one policy for every precision: a step whose loss is not finite, or whose
gradient is not finite, is skipped; under fp16 loss scaling an overflowing gradient is the
scaler's business (it lowers the scale) until the scale is down to 1. More than `max_nan_skips`
skips in a row stop the run. Weights are checked finite before every save, and when the run
stops, the checkpoints whose weights gave the non-finite loss are set aside, so the last good
checkpoint — the one resume and finetune start from — has finite weights that give a finite loss.

Numerics (`precision`): bf16 and fp16 autocast over fp32 weights and optimizer state (fp16 with
loss scaling); bf16-master (the default under DDP) keeps the model's weights in bf16 and their
fp32 masters, moments and multi-micro-batch gradient sums in the optimizer (MasterAdamW, which
also reduces those sums across ranks); fp32 is plain fp32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from engine.data.samples import build_samples, parse_blend
from engine.errors import InputError, LmforgeError, Preempted
from engine.lineage import artifact_manifest, stage_fingerprint
from engine.manifest import Manifest, complete, sha256_file, write_manifest
from engine.metrics import MetricsSink
from engine.model.config import ModelConfig
from engine.parallel import distributed
from engine.parallel.data_parallel import set_gradient_sync
from engine.parallel.grad_norm import clip_grad_norm_
from engine.parallel.mesh import Mesh, all_reduce_sum, build_mesh
from engine.signals import StopSignals
from engine.checkpoint import store as ckpt
from engine.train.build import build
from engine.train.flops import flops_per_token, peak_flops
from engine.train.master_adamw import MasterAdamW, total_norm
from engine.train.spec import TrainSpec, input_paths

log = logging.getLogger(__name__)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def set_split_k_reductions(low_precision: bool) -> None:
    """Whether cuBLAS may add split-K partial sums of bf16/fp16 GEMMs in that precision (torch's
    default). Training turns it off: the weight gradients' long reductions lose enough to slow
    learning (docs/benchmarks.md, loss curves)."""
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = low_precision
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = low_precision


class NonFiniteLoss(LmforgeError):
    """Training diverged: too many steps in a row with a non-finite loss or gradient."""


def _resolve_model_config(spec: TrainSpec, start: Path | None) -> ModelConfig:
    if start is None:
        return spec.model
    stored = ModelConfig.model_validate(ckpt.read_model_config(start))
    if spec.model is not None and spec.model != stored:
        raise InputError(f"{start}: checkpoint architecture differs from the spec's model: "
                         f"{stored.model_dump()} vs {spec.model.model_dump()}")
    if spec.data.seq_length > stored.max_position_embeddings:
        raise InputError(f"data.seq_length {spec.data.seq_length} is above the checkpoint's "
                         f"max_position_embeddings {stored.max_position_embeddings} ({start})")
    errors = spec.layout_errors(stored)
    if errors:
        raise InputError(f"{start}: " + "; ".join(errors))
    return stored


def _eod_id(spec: TrainSpec) -> int | None:
    if not spec.data.eod_mask_loss:
        return None
    if spec.data.eod_id is not None:
        return spec.data.eod_id
    for _, prefix in parse_blend(spec.data.blend):
        m = artifact_manifest(prefix)
        if m and (m.summary.get("tokenizer") or {}).get("eod_id") is not None:
            return int(m.summary["tokenizer"]["eod_id"])
    raise InputError("data.eod_mask_loss needs data.eod_id: the datasets have no manifest naming it")


def _fp32_weights(optimizer: torch.optim.Optimizer):
    """The model's fp32 weights in its parameters for a checkpoint's save or load: MasterAdamW's
    masters swapped in, or the parameters themselves."""
    return optimizer.masters_in_model() if isinstance(optimizer, MasterAdamW) else contextlib.nullcontext()


class Batches:
    """Micro-batches of one data-parallel rank, addressed by (iteration, accumulation step)."""

    def __init__(self, samples, global_batch: int, micro_batch: int, rank: int, world: int,
                 device: torch.device, eod_id: int | None) -> None:
        self.samples, self.G, self.m, self.rank, self.world = samples, global_batch, micro_batch, rank, world
        self.device, self.eod_id = device, eod_id
        self.accum = global_batch // (micro_batch * world)

    def micro(self, iteration: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        first = iteration * self.G + (step * self.world + self.rank) * self.m
        tokens = torch.from_numpy(np.stack([self.samples[i] for i in range(first, first + self.m)]))
        if self.device.type == "cuda":
            tokens = tokens.pin_memory()
        tokens = tokens.to(self.device, non_blocking=True)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = (targets != self.eod_id) if self.eod_id is not None else torch.ones_like(targets, dtype=torch.bool)
        return inputs, targets, mask

    def iteration(self, it: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return (self.micro(it, a) for a in range(self.accum))


def _loss_sum(model, inputs, targets, mask, autocast: torch.dtype | None,
              fused: bool = True) -> torch.Tensor:
    """Sum of the masked token losses (fp32), through the fused chunked head + cross-entropy or
    over full fp32 logits; under autocast to `autocast` if given."""
    ctx = (torch.autocast(inputs.device.type, dtype=autocast) if autocast
           else contextlib.nullcontext())
    with ctx:
        if fused:
            return model(inputs, targets=targets, loss_mask=mask)
        logits = model(inputs)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * mask.flatten()).sum()


@torch.no_grad()
def evaluate(model, batches: Batches, iters: int, autocast: torch.dtype | None,
             fused: bool = True, dp_group=None) -> tuple[float, int]:
    """Mean token loss over `iters` validation global batches (all data-parallel ranks), and
    tokens scored."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=batches.device)
    for it in range(iters):
        for inputs, targets, mask in batches.iteration(it):
            total[0] += _loss_sum(model, inputs, targets, mask, autocast, fused).double()
            total[1] += mask.sum()
    model.train()
    all_reduce_sum(total, dp_group)
    loss_sum, count = total.tolist()
    return loss_sum / max(count, 1), int(count)


def train(spec: TrainSpec, stage: str) -> Manifest | None:
    """Run training; rank 0 returns the manifest, other ranks None."""
    with StopSignals(signal.SIGTERM, signal.SIGUSR2,
                     note="will save a checkpoint after this step and stop") as stop:
        env = distributed.setup(spec.device)
        try:
            done = _finished(spec, stage)
            if done is not None:
                return done if env.is_main else None
            return _train(spec, stage, env, stop)
        finally:
            distributed.teardown()


def _finished(spec: TrainSpec, stage: str) -> Manifest | None:
    """The manifest of this very run if it already finished (a requeued or repeated command):
    nothing is trained or saved again."""
    save_dir = Path(spec.checkpoint.save)
    manifest = complete(save_dir)
    if manifest is None or ckpt.latest_iteration(save_dir) != spec.iters:
        return None
    if manifest.fingerprint != stage_fingerprint(stage, spec, input_paths(spec))[0]:
        return None
    log.info("%s already finished: %s holds its %d iterations; nothing to do", stage, save_dir,
             spec.iters)
    return manifest


def _mesh(spec: TrainSpec, env: distributed.Env) -> Mesh:
    try:
        spec.check_world(env.world_size)
        return build_mesh(spec.layout(env.world_size), env.device)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _train(spec: TrainSpec, stage: str, env: distributed.Env, stop: StopSignals) -> Manifest:
    mesh = _mesh(spec, env)
    G, W = spec.global_batch_size, mesh.layout.dp
    dp_group = mesh.groups["dp"]
    save_dir = Path(spec.checkpoint.save)
    resume = ckpt.latest_iteration(save_dir) is not None
    start = ckpt.checkpoint_path(save_dir) if resume else (
        ckpt.checkpoint_path(spec.load) if spec.load else None)
    cfg = _resolve_model_config(spec, start)
    eod_id = _eod_id(spec)
    if env.device.type == "cuda":
        set_split_k_reductions(low_precision=False)

    n_valid = spec.eval.iters * G if spec.eval.interval or spec.eval.initial else 0
    num = {"train": spec.iters * G, "valid": n_valid}
    # rank 0 checks the datasets and builds the cached sample indices, the others then read them
    if env.is_main:
        sets = build_samples(spec.data.blend, spec.data.split, spec.data.seq_length, num, spec.seed,
                             spec.data.cache_dir)
    distributed.barrier()
    if not env.is_main:
        sets = build_samples(spec.data.blend, spec.data.split, spec.data.seq_length, num, spec.seed,
                             spec.data.cache_dir, verify=False)
    m = spec.micro_batch_size
    train_batches = Batches(sets["train"], G, m, mesh.dp_rank, W, env.device, eod_id)
    valid_batches = (Batches(sets["valid"], G, m, mesh.dp_rank, W, env.device, eod_id)
                     if n_valid else None)

    built = build(cfg, spec, mesh, env.device)
    model, optimizer, n_params = built.model, built.optimizer, built.parameters
    master = spec.precision == "bf16-master"
    autocast = _AUTOCAST.get(spec.precision)
    scaler = torch.amp.GradScaler(env.device.type) if spec.precision == "fp16" else None

    iteration = 0
    if start is not None:
        keep_optimizer = resume or stage == "pretrain"
        with _fp32_weights(optimizer):
            meta = ckpt.load_checkpoint(start, model, optimizer if keep_optimizer else None,
                                        restore_rng=keep_optimizer)
        if keep_optimizer:
            iteration = int(meta["iteration"])
            if scaler and meta.get("grad_scaler"):
                scaler.load_state_dict(meta["grad_scaler"])
        log.info("%s from %s (iteration %d)", "resumed" if resume else "started", start, iteration)

    sink = MetricsSink(spec.metrics_file or save_dir / "metrics.jsonl", enabled=env.is_main)
    if iteration == 0:
        sink.log_params({"stage": stage, **spec.model_dump(mode="json", exclude={"model"}),
                         "model": cfg.model_dump(mode="json"), "world_size": env.world_size,
                         "layout": mesh.layout.describe()})
    tokens_per_iter = G * spec.data.seq_length
    flops_tok = flops_per_token(cfg, spec.data.seq_length)
    peak = peak_flops(env.device)
    meta_common = {"spec": spec.model_dump(mode="json"), "stage": stage}

    def save(it: int) -> Path:
        extra = {"grad_scaler": scaler.state_dict()} if scaler else {}
        with _fp32_weights(optimizer):
            if not _weights_finite(model):
                raise _diverged(save_dir, it, f"weights not finite after iteration {it}",
                                env.is_main)
            return ckpt.save_checkpoint(save_dir, it, model, optimizer,
                                        {**meta_common, "consumed_samples": it * G, **extra},
                                        cfg.model_dump(mode="json"), spec.checkpoint.keep_last)

    log.info("training %s: %d iterations of %d samples × %d tokens on %d rank(s) (%s), %s, %s",
             stage, spec.iters, G, spec.data.seq_length, env.world_size, mesh.layout.describe(),
             env.device, spec.precision)
    if _agree(stop.received is not None, env.device):
        raise Preempted(f"{stop.name or 'a stop signal'} received during start-up, before "
                        f"iteration {iteration + 1}; nothing new to save")
    nan_skips = 0
    last: dict[str, float] = {}
    window_loss = torch.zeros((), dtype=torch.float64, device=env.device)
    window_steps, window_start = 0, time.perf_counter()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    model.train()
    if valid_batches and spec.eval.initial and iteration == 0:
        vloss, _ = evaluate(model, valid_batches, spec.eval.iters, autocast, spec.fused_loss,
                            dp_group)
        sink.log_metrics({"valid_loss": vloss, "valid_ppl": math.exp(min(vloss, 50))}, 0)
        log.info("iter 0 | valid loss %.4f", vloss)
    while iteration < spec.iters:
        lr = spec.optim.at(iteration, spec.iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = list(train_batches.iteration(iteration))
        count = torch.stack([mask.sum() for _, _, mask in micro]).sum().double()
        all_reduce_sum(count, dp_group)
        step_loss = torch.zeros((), dtype=torch.float64, device=env.device)
        # MasterAdamW sums several micro-batches in fp32 and reduces the sums once, after them;
        # a single micro-batch is reduced by the wrapper, overlapped with the backward
        summing = master and len(micro) > 1
        for a, (inputs, targets, mask) in enumerate(micro):
            set_gradient_sync(model, a == len(micro) - 1 and not summing)
            loss_sum = _loss_sum(model, inputs, targets, mask, autocast, spec.fused_loss)
            loss = loss_sum * W / count  # DP averages gradients over W ranks
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss_sum.detach().double()
            if summing:
                optimizer.accumulate_grads()
        if summing:
            optimizer.all_reduce_grads()
        if scaler:
            scaler.unscale_(optimizer)
        if master:  # clipping's coefficient is applied inside the fp32 update
            grad_norm = total_norm(optimizer.grads())
            clip_scale = ((spec.optim.clip_grad / (grad_norm + 1e-6)).clamp(max=1.0)
                          if spec.optim.clip_grad else None)
        else:
            grad_norm = clip_grad_norm_(model.parameters(), spec.optim.clip_grad)
        all_reduce_sum(step_loss, dp_group)
        grad_bad = ~torch.isfinite(grad_norm)
        if scaler:  # an overflow is the scaler's to handle while lowering the scale can help
            grad_bad &= scaler.get_scale() <= 1.0
        bad = ~torch.isfinite(step_loss) | grad_bad
        flags = torch.stack([bad.float(),
                             torch.tensor(float(stop.received is not None), device=env.device)])
        distributed.all_reduce_sum(flags)
        nonfinite, stopping = (bool(v) for v in flags.tolist())
        if nonfinite:
            nan_skips += 1
            optimizer.zero_grad(set_to_none=True)
            if scaler:
                scaler.update()  # the inf check recorded by unscale_ lowers the scale
            log.warning("iteration %d: non-finite loss or gradient, step skipped (%d/%d)",
                        iteration + 1, nan_skips, spec.max_nan_skips)
            if nan_skips > spec.max_nan_skips:
                raise _diverged(save_dir, iteration, f"loss or gradient non-finite in {nan_skips} "
                                f"consecutive steps at iteration {iteration + 1}", env.is_main)
            continue
        nan_skips = 0
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        elif master:
            optimizer.step(grad_scale=clip_scale)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iteration += 1
        window_loss += step_loss / count
        window_steps += 1

        if iteration % spec.log_interval == 0 or iteration == spec.iters:
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
            elapsed = time.perf_counter() - window_start
            tps = window_steps * tokens_per_iter / elapsed
            last = {"loss": window_loss.item() / window_steps, "lr": lr,
                    "grad_norm": float(grad_norm), "tokens_per_s": tps,
                    "tflops_per_gpu": tps * flops_tok / env.world_size / 1e12}
            if peak:
                last["mfu"] = tps * flops_tok / env.world_size / peak
            if env.device.type == "cuda":
                last["peak_memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
            sink.log_metrics(last, iteration)
            log.info("iter %d/%d | %s", iteration, spec.iters,
                     " | ".join(f"{k} {v:.4g}" for k, v in last.items()))
            window_loss.zero_()
            window_steps, window_start = 0, time.perf_counter()
        paused = time.perf_counter()  # evaluation and saving do not count against throughput
        if valid_batches and spec.eval.interval and (iteration % spec.eval.interval == 0
                                                     or iteration == spec.iters):
            vloss, _ = evaluate(model, valid_batches, spec.eval.iters, autocast, spec.fused_loss,
                                dp_group)
            last.update(valid_loss=vloss, valid_ppl=math.exp(min(vloss, 50)))
            sink.log_metrics({"valid_loss": vloss, "valid_ppl": last["valid_ppl"]}, iteration)
            log.info("iter %d | valid loss %.4f | valid ppl %.3f", iteration, vloss, last["valid_ppl"])
        interval = spec.checkpoint.interval
        if stopping:
            save(iteration)
            raise Preempted(f"signal received at iteration {iteration}; checkpoint saved")
        if interval and iteration % interval == 0 and iteration != spec.iters:
            save(iteration)
        window_start += time.perf_counter() - paused
    final = save(iteration)
    return _manifest(spec, stage, final, last, iteration, n_params, start) if env.is_main else None


def _agree(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any."""
    value = torch.tensor(float(flag), device=device)
    distributed.all_reduce_sum(value)
    return bool(value.item())


def _weights_finite(model: torch.nn.Module) -> bool:
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    finite = torch.stack([torch.isfinite(t).all() for t in local]).all()
    return not _agree(not bool(finite), finite.device)


def _diverged(save_dir: Path, iteration: int, what: str, is_main: bool) -> NonFiniteLoss:
    """Set aside the checkpoints whose weights are the diverged ones (iteration and later) and
    name the last good one."""
    good = ckpt.set_aside_from(save_dir, iteration) if is_main else None
    distributed.barrier()
    return NonFiniteLoss(f"{what}; stopping. Last good checkpoint: "
                         f"{good or 'none (the run has no checkpoint with finite weights and loss)'}")


def _manifest(spec: TrainSpec, stage: str, final: Path, last: dict, iteration: int,
              n_params: int, start: Path | None) -> Manifest:
    fp, inputs = stage_fingerprint(stage, spec, input_paths(spec))
    meta = ckpt.check_complete(final)
    files = {f"{final.name}/{name}": entry for name, entry in meta["files"].items()}
    files[f"{final.name}/meta.json"] = sha256_file(final / "meta.json")
    summary = {"iterations": iteration, "latest": final.name,
               "tokens": iteration * spec.global_batch_size * spec.data.seq_length,
               "parameters": n_params, **{k: round(v, 6) for k, v in last.items()}}
    manifest = Manifest(kind="checkpoint", stage=stage, spec=spec.model_dump(mode="json"),
                        inputs=inputs, fingerprint=fp,
                        summary=summary, files=files)
    write_manifest(final.parent, manifest)
    return manifest
