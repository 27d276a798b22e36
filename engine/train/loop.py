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

With pipeline parallelism a step's micro-batches go through the pipeline schedule instead of
the accumulation loop, each scaled as above; the loss exists on the last stage and is summed
over the pipeline group, then over the data-parallel group, as without a pipeline.

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
from engine.model.kd_loss import TeacherTarget
from engine.parallel import distributed
from engine.parallel.data_parallel import set_gradient_sync
from engine.parallel.grad_norm import clip_grad_norm_
from engine.parallel.context_parallel import shard_sequence
from engine.parallel.mesh import Mesh, all_reduce_sum, build_mesh
from engine.parallel.pipeline import pipeline_step
from engine.signals import StopSignals
from engine.checkpoint import store as ckpt
from engine.train.build import build
from engine.train.context import extended_config
from engine.train.flops import flops_per_token, peak_flops
from engine.train.master_adamw import MasterAdamW, total_norm
from engine.train.spec import TrainSpec, input_paths
from engine.train.held import held_bytes
from engine.train.teacher import load_teacher

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
    context = getattr(spec, "context", None)  # finetune's
    if context is not None:
        try:
            stored = extended_config(stored, context)
        except ValueError as exc:
            raise InputError(f"{start}: {exc}") from None
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
                 device: torch.device, eod_id: int | None, cp: tuple[int, int] = (1, 0)) -> None:
        self.samples, self.G, self.m, self.rank, self.world = samples, global_batch, micro_batch, rank, world
        self.device, self.eod_id = device, eod_id
        self.cp = cp  # (context-parallel size, this rank's place): which chunks it keeps
        self.accum = global_batch // (micro_batch * world)

    def micro(self, iteration: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        first = iteration * self.G + (step * self.world + self.rank) * self.m
        tokens = torch.from_numpy(np.stack([self.samples[i] for i in range(first, first + self.m)]))
        if self.device.type == "cuda":
            tokens = tokens.pin_memory()
        tokens = tokens.to(self.device, non_blocking=True)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = (targets != self.eod_id) if self.eod_id is not None else torch.ones_like(targets, dtype=torch.bool)
        if self.cp[0] > 1:
            return shard_sequence((inputs, targets, mask), *self.cp)
        return inputs, targets, mask

    def iteration(self, it: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return (self.micro(it, a) for a in range(self.accum))


def _loss_sum(model, inputs, targets, mask, autocast: torch.dtype | None,
              fused: bool = True) -> torch.Tensor:
    """Sum of the masked token losses (fp32), through the fused chunked head + cross-entropy or
    over full fp32 logits; under autocast to `autocast` if given."""
    with _autocast(inputs.device, autocast):
        if fused:
            return model(inputs, targets=targets, loss_mask=mask)
        logits = model(inputs)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * mask.flatten()).sum()


def train(spec: TrainSpec, stage: str) -> Manifest | None:
    """Run training; rank 0 returns the manifest, other ranks None."""
    with StopSignals(signal.SIGTERM, signal.SIGUSR2,
                     note="will save a checkpoint after this step and stop") as stop:
        env = distributed.setup(spec.device, cpu_offload=spec.cpu_offload)
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
    return Trainer(spec, stage, env, stop).run()


class Trainer:
    """One run of the loop. __init__ sets up what every step needs (mesh, data, model, the
    checkpoint started from); run() steps to the end. Each method is one part of a step."""

    def __init__(self, spec: TrainSpec, stage: str, env: distributed.Env, stop: StopSignals):
        self.spec, self.stage, self.env, self.stop = spec, stage, env, stop
        self.mesh = _mesh(spec, env)
        self.save_dir = Path(spec.checkpoint.save)
        self.resume = ckpt.latest_iteration(self.save_dir) is not None
        self.start = ckpt.checkpoint_path(self.save_dir) if self.resume else (
            ckpt.checkpoint_path(spec.load) if spec.load else None)
        self.cfg = _resolve_model_config(spec, self.start)
        eod_id = _eod_id(spec)
        if env.device.type == "cuda":
            set_split_k_reductions(low_precision=False)
        self.train_batches, self.valid_batches = self._batches(eod_id)
        built = build(self.cfg, spec, self.mesh, env.device)
        self.model, self.optimizer, self.pipeline = built.model, built.optimizer, built.pipeline
        self.n_params = built.parameters
        self.teacher = (load_teacher(spec, self.cfg, self.mesh, env.device) if spec.distill
                        else None)
        self.master = spec.precision == "bf16-master"
        self.autocast = _AUTOCAST.get(spec.precision)
        self.scaler = torch.amp.GradScaler(env.device.type) if spec.precision == "fp16" else None
        self.iteration = self._load()
        self.sink = MetricsSink(spec.metrics_file or self.save_dir / "metrics.jsonl",
                                enabled=env.is_main)
        self.last: dict[str, float] = {}
        self.held: dict[str, int] | None = None

    # ---- set-up ----

    def _batches(self, eod_id: int | None) -> tuple[Batches, Batches | None]:
        """The train and validation batches of this rank's data-parallel share. Rank 0 checks
        the datasets and builds the cached sample indices, the others then read them."""
        spec, G = self.spec, self.spec.global_batch_size
        n_valid = spec.eval.iters * G if spec.eval.interval or spec.eval.initial else 0
        args = (spec.data.blend, spec.data.split, spec.data.seq_length,
                {"train": spec.iters * G, "valid": n_valid}, spec.seed, spec.data.cache_dir)
        minimum = spec.data.min_document_length
        if self.env.is_main:
            sets = build_samples(*args, min_length=minimum)
        distributed.barrier()
        if not self.env.is_main:
            sets = build_samples(*args, verify=False, min_length=minimum)
        self.documents = {split: samples.documents for split, samples in sets.items()}
        for split, (used, total) in self.documents.items():
            log.info("%s: %d of %d documents%s", split, used, total,
                     f" hold {minimum} tokens or more (data.documents: long)" if minimum else "")

        def batches(split: str) -> Batches:
            return Batches(sets[split], G, spec.micro_batch_size, self.mesh.dp_rank,
                           self.mesh.layout.dp, self.env.device, eod_id,
                           (self.mesh.layout.cp, self.mesh.coordinate("cp")))

        return batches("train"), batches("valid") if n_valid else None

    def _load(self) -> int:
        """The weights of the checkpoint started from; its optimizer, RNG and iteration too when
        resuming or continuing a pretrain. Returns the iteration to start at."""
        if self.start is None:
            return 0
        keep_optimizer = self.resume or self.stage == "pretrain"
        with _fp32_weights(self.optimizer):
            meta = ckpt.load_checkpoint(self.start, self.model,
                                        self.optimizer if keep_optimizer else None,
                                        restore_rng=keep_optimizer)
        iteration = int(meta["iteration"]) if keep_optimizer else 0
        if keep_optimizer and self.scaler and meta.get("grad_scaler"):
            self.scaler.load_state_dict(meta["grad_scaler"])
        log.info("%s from %s (iteration %d)", "resumed" if self.resume else "started",
                 self.start, iteration)
        return iteration

    # ---- the loop ----

    def run(self) -> Manifest | None:
        """Train to spec.iters; rank 0 returns the manifest."""
        self._log_start()
        if _agree(self.stop.received is not None, self.env.device):
            raise Preempted(f"{self.stop.name or 'a stop signal'} received during start-up, "
                            f"before iteration {self.iteration + 1}; nothing new to save")
        if self.env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.env.device)
        self.model.train()
        if self.valid_batches and self.spec.eval.initial and self.iteration == 0:
            self._validate()
        window, nan_skips = _Window(), 0
        while self.iteration < self.spec.iters:
            lr = self.spec.optim.at(self.iteration, self.spec.iters)
            loss, grad_norm, nonfinite, stopping = self._step(lr)
            if nonfinite:
                nan_skips += 1
                self._skipped(nan_skips)
                continue
            nan_skips = 0
            self.iteration += 1
            window.add(loss)
            self._after_step(window, lr, grad_norm, stopping)
        final = self._save()
        return self._manifest(final) if self.env.is_main else None

    def _step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
        """One optimizer step on this iteration's global batch. Returns the mean token loss
        (and, distilling, its cross-entropy and KD parts after it), the gradient norm, and two
        flags every rank agrees on: the step was not finite (and skipped), a stop signal
        arrived."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = list(self.train_batches.iteration(self.iteration))
        count = torch.stack([mask.sum() for _, _, mask in micro]).sum().double()
        all_reduce_sum(count, self.mesh.groups["dp"])
        loss_sums = self._forward_backward(micro, count)
        grad_norm, clip_scale = self._clip()
        all_reduce_sum(loss_sums, self.mesh.groups["dp"])
        nonfinite, stopping = self._flags(loss_sums[0], grad_norm)
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.update()  # the inf check recorded by unscale_ lowers the scale
        else:
            self._optimizer_step(clip_scale)
        return loss_sums / count, grad_norm, nonfinite, stopping

    def _forward_backward(self, micro: list, count: torch.Tensor) -> torch.Tensor:
        """The gradients of the step's loss (token losses over the global batch / its `count`
        loss tokens, times the data- and context-parallel size, which DP averages over); returns
        the loss sum of this rank's micro-batches (fp64), and distilling its CE and KD sums
        after it."""
        W = self.mesh.layout.dp_cp
        if self.pipeline is not None:
            return self._pipelined(micro, W / count, train=True).reshape(1)
        step_loss = torch.zeros(3 if self.teacher else 1, dtype=torch.float64,
                                device=self.env.device)
        # MasterAdamW sums several micro-batches in fp32 and reduces the sums once, after them;
        # a single micro-batch is reduced by the wrapper, overlapped with the backward
        summing = self.master and len(micro) > 1
        for a, (inputs, targets, mask) in enumerate(micro):
            # CPU offload reduces every micro-batch: its gradients add up in host memory rather
            # than whole on the GPU
            last = a == len(micro) - 1 or self.spec.cpu_offload
            set_gradient_sync(self.model, last and not summing)
            if self.teacher is None:
                loss_sum = _loss_sum(self.model, inputs, targets, mask, self.autocast,
                                     self.spec.fused_loss)
                sums = loss_sum.detach()[None]
            else:
                loss_sum, parts = self._distillation_loss_sum(inputs, targets, mask)
                sums = torch.cat((loss_sum.detach()[None], parts))
            loss = loss_sum * W / count
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            step_loss += sums.double()
            if summing:
                self.optimizer.accumulate_grads()
        if summing:
            self.optimizer.all_reduce_grads()
        return step_loss

    def _distillation_loss_sum(self, inputs, targets, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's distillation loss sum and its [CE, KD] sums: the teacher's hidden
        states without a graph, then the student's chunked heads with them."""
        d = self.spec.distill
        with torch.no_grad(), _autocast(inputs.device, self.autocast):
            hidden = self.teacher(inputs, return_hidden=True)
        target = TeacherTarget(hidden, self.teacher.head_weight(), d.alpha, d.temperature,
                               d.top_k)
        with _autocast(inputs.device, self.autocast):
            return self.model(inputs, targets=targets, loss_mask=mask, teacher=target)

    def _pipelined(self, micro: list, scale: torch.Tensor | float, train: bool) -> torch.Tensor:
        """The micro-batches through the pipeline schedule, forward and backward (forward only
        unless `train`), each micro-batch's loss times `scale`. Returns the loss sum of this
        data-parallel rank (fp64) on every rank of its pipeline: the last stage has it."""
        inputs, targets, mask = (torch.cat(parts) for parts in zip(*micro))
        if self.scaler and train:
            scale = self.scaler.scale(scale)
        pipe = self.pipeline
        with _autocast(self.env.device, self.autocast):
            loss_sum = pipeline_step(pipe.schedule, inputs, targets, mask, pipe.is_first,
                                     pipe.is_last, scale, train)
        total = torch.zeros((), dtype=torch.float64, device=self.env.device)
        if loss_sum is not None:
            total += loss_sum.double()
        return all_reduce_sum(total, self.mesh.groups["pp"])

    def _clip(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The global gradient norm (before clipping) and, under MasterAdamW, the clipping
        coefficient that its fp32 update applies; otherwise the gradients are clipped here."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.spec.optim.clip_grad
        if self.master:
            norm = total_norm(self.optimizer.grads())
            return norm, (clip / (norm + 1e-6)).clamp(max=1.0) if clip else None
        return clip_grad_norm_(self.model.parameters(), clip, self.mesh.groups["pp"]), None

    def _flags(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, bool]:
        """One small all-reduce: is the step not finite (on any rank), did a stop signal arrive."""
        grad_bad = ~torch.isfinite(grad_norm)
        if self.scaler:  # an overflow is the scaler's to handle while lowering the scale can help
            grad_bad &= self.scaler.get_scale() <= 1.0
        bad = ~torch.isfinite(loss_sum) | grad_bad
        flags = torch.stack([bad.float(), torch.tensor(float(self.stop.received is not None),
                                                       device=self.env.device)])
        distributed.all_reduce_sum(flags)
        nonfinite, stopping = (bool(v) for v in flags.tolist())
        return nonfinite, stopping

    def _optimizer_step(self, clip_scale: torch.Tensor | None) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.master:
            self.optimizer.step(grad_scale=clip_scale)
        else:
            self.optimizer.step()
        if self.held is None:  # the first step: the optimizer's state exists now
            self.held = held_bytes(self.model, self.optimizer, self.spec.cpu_offload)
            log.info("held by this rank after the first update: %s",
                     ", ".join(f"{k} {v} B" for k, v in self.held.items()))
        self.optimizer.zero_grad(set_to_none=True)

    def _skipped(self, nan_skips: int) -> None:
        """A non-finite step was skipped; too many in a row stop the run."""
        spec = self.spec
        log.warning("iteration %d: non-finite loss or gradient, step skipped (%d/%d)",
                    self.iteration + 1, nan_skips, spec.max_nan_skips)
        if nan_skips > spec.max_nan_skips:
            raise _diverged(self.save_dir, self.iteration,
                            f"loss or gradient non-finite in {nan_skips} consecutive steps at "
                            f"iteration {self.iteration + 1}", self.env.is_main)

    def _after_step(self, window: _Window, lr: float, grad_norm: torch.Tensor,
                    stopping: bool) -> None:
        """Metrics, validation and checkpoints due after the step (the last two not counted
        against throughput)."""
        it, spec = self.iteration, self.spec
        if it % spec.log_interval == 0 or it == spec.iters:
            self.last = self._log_metrics(window, lr, grad_norm)
        with window.paused():
            if self.valid_batches and spec.eval.interval and (it % spec.eval.interval == 0
                                                              or it == spec.iters):
                self.last.update(self._validate())
            if stopping:
                self._save()
                raise Preempted(f"signal received at iteration {it}; checkpoint saved")
            interval = spec.checkpoint.interval
            if interval and it % interval == 0 and it != spec.iters:
                self._save()

    # ---- metrics, validation, checkpoints ----

    def _log_start(self) -> None:
        spec, env = self.spec, self.env
        if self.iteration == 0:
            self.sink.log_params({"stage": self.stage,
                                  **spec.model_dump(mode="json", exclude={"model"}),
                                  "model": self.cfg.model_dump(mode="json"),
                                  "world_size": env.world_size,
                                  "layout": self.mesh.layout.describe()})
        log.info("training %s: %d iterations of %d samples × %d tokens on %d rank(s) (%s), %s, "
                 "%s", self.stage, spec.iters, spec.global_batch_size, spec.data.seq_length,
                 env.world_size, self.mesh.layout.describe(), env.device, spec.precision)

    def _log_metrics(self, window: _Window, lr: float, grad_norm: torch.Tensor) -> dict:
        """Loss, throughput and MFU (over every rank of the job) since the last log line."""
        device, spec = self.env.device, self.spec
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        losses, steps_per_s = window.take()
        tps = steps_per_s * spec.global_batch_size * spec.data.seq_length
        flops = tps * flops_per_token(self.cfg, spec.data.seq_length) / self.env.world_size
        last = {"loss": losses[0], **dict(zip(("loss_ce", "loss_kd"), losses[1:])), "lr": lr,
                "grad_norm": float(grad_norm), "tokens_per_s": tps, "tflops_per_gpu": flops / 1e12}
        peak = peak_flops(device)
        if peak:
            last["mfu"] = flops / peak
        if device.type == "cuda":
            last["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        self.sink.log_metrics(last, self.iteration)
        log.info("iter %d/%d | %s", self.iteration, spec.iters,
                 " | ".join(f"{k} {v:.4g}" for k, v in last.items()))
        return last

    def _validate(self) -> dict[str, float]:
        loss = self._validation_loss()
        metrics = {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50))}
        self.sink.log_metrics(metrics, self.iteration)
        log.info("iter %d | valid loss %.4f | valid ppl %.3f", self.iteration, loss,
                 metrics["valid_ppl"])
        return metrics

    @torch.no_grad()
    def _validation_loss(self) -> float:
        """Mean token loss over spec.eval.iters validation global batches (all data-parallel
        ranks)."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for it in range(self.spec.eval.iters):
            micro = list(self.valid_batches.iteration(it))
            if self.pipeline is not None:
                total[0] += self._pipelined(micro, 1.0, train=False)
            for inputs, targets, mask in micro:
                if self.pipeline is None:
                    total[0] += _loss_sum(self.model, inputs, targets, mask, self.autocast,
                                          self.spec.fused_loss).double()
                total[1] += mask.sum()
        self.model.train()
        all_reduce_sum(total, self.mesh.groups["dp"])
        loss_sum, count = total.tolist()
        return loss_sum / max(count, 1)

    def _save(self) -> Path:
        """A checkpoint of this iteration, after checking the weights are finite."""
        extra = {"grad_scaler": self.scaler.state_dict()} if self.scaler else {}
        meta = {"spec": self.spec.model_dump(mode="json"), "stage": self.stage,
                "consumed_samples": self.iteration * self.spec.global_batch_size, **extra}
        with _fp32_weights(self.optimizer):
            if not _weights_finite(self.model):
                raise _diverged(self.save_dir, self.iteration,
                                f"weights not finite after iteration {self.iteration}",
                                self.env.is_main)
            return ckpt.save_checkpoint(self.save_dir, self.iteration, self.model,
                                        self.optimizer, meta, self.cfg.model_dump(mode="json"),
                                        self.spec.checkpoint.keep_last)

    def _manifest(self, final: Path) -> Manifest:
        return _manifest(self.spec, self.stage, final, self.last, self.iteration, self.n_params,
                         self.documents, self.held)


class _Window:
    """The steps since the last log line: their mean losses (the loss, and distilling its parts)
    and their rate, the time spent in validation and checkpoints left out."""

    def __init__(self):
        self.loss: torch.Tensor | float = 0.0
        self.steps, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss = self.loss + loss
        self.steps += 1

    def take(self) -> tuple[list[float], float]:
        """(mean losses, steps per second), and a new window."""
        mean = [v / self.steps for v in self.loss.tolist()]
        rate = self.steps / (time.perf_counter() - self.start)
        self.loss = 0.0
        self.steps, self.start = 0, time.perf_counter()
        return mean, rate

    @contextlib.contextmanager
    def paused(self):
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - paused


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


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
              n_params: int, documents: dict[str, tuple[int, int]],
              held: dict[str, int] | None) -> Manifest:
    fp, inputs = stage_fingerprint(stage, spec, input_paths(spec))
    meta = ckpt.check_complete(final)
    files = {f"{final.name}/{name}": entry for name, entry in meta["files"].items()}
    files[f"{final.name}/meta.json"] = sha256_file(final / "meta.json")
    summary = {"iterations": iteration, "latest": final.name,
               "tokens": iteration * spec.global_batch_size * spec.data.seq_length,
               "parameters": n_params,
               "documents": {split: {"used": used, "of": total}
                             for split, (used, total) in documents.items()},
               **{k: round(v, 6) for k, v in last.items()}}
    if held is not None:  # none when resumed at the end
        summary["held_bytes"] = held
    manifest = Manifest(kind="checkpoint", stage=stage, spec=spec.model_dump(mode="json"),
                        inputs=inputs, fingerprint=fp,
                        summary=summary, files=files)
    write_manifest(final.parent, manifest)
    return manifest
