"""Megatron-style layouts on the 8 GPUs of one host (issue 29's kind, nvidia-h200-x8), each run
through the engine's own bootstrap (bench/parity.py: one process per GPU, its rank from the
environment), each beside the planner's prediction for the same spec:

- throughput: tokens/s per GPU, MFU and peak memory of each layout; the planner picks each
  layout's micro-batch and recompute (the fastest it predicts to fit), and for a shape too big
  for the GPUs (`--layers fit`) the most layers with which every layout asked for fits;
- bubbles: the same rows for plain and interleaved 1F1B, where the step time against the
  planner's is the test of its bubble model;
- reshard: a run at TP 4 × PP 2 saved halfway, that checkpoint resharded to FSDP 8 by the
  `reshard` stage, training resumed from it: its losses against the run that never stopped.

    python -m bench.scale --dataset PREFIX --shape llama-3-8b --seq 8192 \\
        --layouts fsdp8 tp2-fsdp4 tp4-pp2                           (GPU: bench/gpu_scale.sh)
    python -m bench.scale --dataset PREFIX --reshard --shape tinyllama-1.1b
    python -m bench.scale --dataset PREFIX --device cpu --shape tiny --seq 64 ...   (gloo)
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from bench.parity import SHAPES, records, run_ranks
from engine.model.config import ModelConfig
from engine.plan.estimate import Estimate
from engine.plan.search import ranked
from engine.plan.timing import Gpu, gpus
from engine.train.spec import PretrainSpec

SHAPES = {**SHAPES, "llama-3-8b": SHAPES["8b"], "llama-70b": (128256, 8192, 28672, 80, 64, 8),
          "tiny8": (512, 64, 128, 4, 8, 8)}  # tiny8: TP 8 divides its heads (CPU check)
GPUS = 8
LAYOUTS = {  # name: the spec's layout fields (the rest of the 8 ranks data parallel)
    "fsdp8": {"data_parallel": "fsdp"},
    "tp2-fsdp4": {"tensor_parallel": 2, "data_parallel": "fsdp"},
    "tp4-pp2": {"tensor_parallel": 4, "pipeline_parallel": 2},
    "tp4-pp2-interleaved": {"tensor_parallel": 4, "pipeline_parallel": 2,
                            "pipeline_schedule": "interleaved-1f1b", "virtual_stages": 2},
    "tp8": {"tensor_parallel": 8},
    "pp8": {"pipeline_parallel": 8},
    "pp8-interleaved": {"pipeline_parallel": 8, "pipeline_schedule": "interleaved-1f1b",
                        "virtual_stages": 2},
}


def base_spec(args, layers: int, save: Path) -> dict:
    v, h, f, _, heads, kv = SHAPES[args.shape]
    return {"model": {"vocab_size": v, "hidden_size": h, "intermediate_size": f,
                      "num_layers": layers, "num_heads": heads, "num_kv_heads": kv,
                      "max_position_embeddings": args.seq},
            "data": {"blend": [args.dataset], "split": "99,1,0", "seq_length": args.seq},
            "checkpoint": {"save": str(save)}, "iters": args.iters, "log_interval": 1,
            "global_batch_size": args.global_batch, "compile": args.device == "cuda",
            "device": args.device, "optim": {"lr": 3e-4, "warmup_iters": 2},
            "eval": {"interval": None}}


def planned(base: dict, layout: str, gpu: Gpu) -> tuple[dict, Estimate]:
    """The layout's spec with the micro-batch and recompute the planner predicts fastest among
    those that fit (the fastest of all when none fits), and its estimate."""
    specs = []
    for micro, recompute in itertools.product((1, 2, 4), ("none", "selective", "full")):
        try:
            spec = PretrainSpec.model_validate({**base, **LAYOUTS[layout],
                                                "micro_batch_size": micro, "recompute": recompute})
            spec.check_world(GPUS)
        except (ValidationError, ValueError):  # a batch these ranks do not split into
            continue
        specs.append(spec)
    best = ranked(ModelConfig.model_validate(base["model"]), specs, GPUS, gpu, GPUS)[0]
    return {**base, **best.fields}, best


def layers_that_fit(args, gpu: Gpu) -> int:
    """The most layers (at most the shape's) with which every layout asked for is predicted to
    fit, so that the rows compare the same model."""
    for layers in range(SHAPES[args.shape][3], 0, -1):
        base = base_spec(args, layers, Path("ckpt"))
        if all(planned(base, layout, gpu)[1].fits for layout in args.layouts):
            return layers
    raise SystemExit(f"not one layer of {args.shape} fits every layout of {args.layouts}")


def run(data: dict, name: str, work: Path) -> list[dict] | str:
    """Train `data` on 8 ranks, stopped once its last step is logged (before the final
    checkpoint); its metrics records, or the log's tail when it failed."""
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(data))
    log, save = work / f"{name}.log", Path(data["checkpoint"]["save"])

    def done() -> bool:
        try:
            return any(r["step"] == data["iters"] for r in records(save))
        except (OSError, ValueError):  # not written yet, or a line half written
            return False

    if run_ranks(["pretrain", "--config", str(config)], GPUS, log, stop_when=done):
        return log.read_text()[-2000:]
    return records(save)


def row(layout: str, data: dict, predicted: Estimate, steps: list[dict]) -> dict:
    """Measured (the second half of the steps: after compilation and warm-up) beside predicted."""
    window = steps[len(steps) // 2:]
    tokens_per_s = sum(r["tokens_per_s"] for r in window) / len(window)
    mfu = [r["mfu"] for r in window if "mfu" in r]
    timing = predicted.timing
    return {"layout": layout, **{k: data.get(k) for k in ("micro_batch_size", "recompute")},
            "layers": data["model"]["num_layers"],
            "tokens_per_s_per_gpu": round(tokens_per_s / GPUS),
            "step_s": round(predicted.tokens_per_step / tokens_per_s, 3),
            "mfu": round(sum(mfu) / len(mfu), 4) if mfu else None,
            "peak_memory_gib_rank0": max((r.get("peak_memory_gib", 0.0) for r in steps)),
            "predicted": {"tokens_per_s_per_gpu": round(predicted.tokens_per_s / GPUS),
                          "step_s": round(timing.step_s, 3), "mfu": round(timing.mfu, 4),
                          "bubble_share": round(timing.bubble_s / timing.step_s, 3),
                          "gib_most_loaded": round(predicted.memory.total / 2**30, 2),
                          "fits": predicted.fits},
            "losses": [round(r["loss"], 5) for r in steps]}


def throughput(args, gpu: Gpu, work: Path) -> None:
    layers = layers_that_fit(args, gpu) if args.layers == "fit" else int(
        args.layers or SHAPES[args.shape][3])
    for layout in args.layouts:
        data, predicted = planned(base_spec(args, layers, work / layout), layout, gpu)
        steps = run(data, layout, work)
        out = {"error": steps} if isinstance(steps, str) else row(layout, data, predicted, steps)
        print(json.dumps({"shape": args.shape, "seq": args.seq, "layout": layout,
                          "global_batch": args.global_batch, **out}), flush=True)


def reshard_resume(args, gpu: Gpu, work: Path) -> None:
    """TP 4 × PP 2 for `iters` steps, saved halfway; that checkpoint resharded to FSDP 8 and
    trained on to the same last step: the steps after the save, both runs."""
    half = args.iters // 2
    first, _ = planned(base_spec(args, SHAPES[args.shape][3], work / "tp4-pp2"), "tp4-pp2", gpu)
    first["checkpoint"] = {**first["checkpoint"], "interval": half, "keep_last": None}
    through = run(first, "tp4-pp2", work)
    resharded = work / "fsdp8-from-tp4-pp2"
    status = run_ranks(["reshard", "--input", str(work / "tp4-pp2" / f"iter_{half:07d}"),
                        "--output", str(resharded), "--data-parallel", "fsdp",
                        "--device", args.device], GPUS, work / "reshard.log")
    if isinstance(through, str) or status:
        raise SystemExit(through if isinstance(through, str) else
                         (work / "reshard.log").read_text()[-2000:])
    second, _ = planned({**base_spec(args, first["model"]["num_layers"], work / "fsdp8"),
                         "load": str(resharded)}, "fsdp8", gpu)
    resumed = run(second, "fsdp8", work)
    if isinstance(resumed, str):
        raise SystemExit(resumed)
    before = {r["step"]: r["loss"] for r in through}
    after = {r["step"]: r["loss"] for r in resumed}
    gaps = [abs(after[s] - before[s]) for s in sorted(after)]
    print(json.dumps({"shape": args.shape, "saved_at": half, "steps_after": sorted(after),
                      "uninterrupted": [round(before[s], 5) for s in sorted(after)],
                      "resumed_fsdp8": [round(after[s], 5) for s in sorted(after)],
                      "max_loss_gap": round(max(gaps), 6),
                      "first_resumed_step": min(after)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", required=True, help="a token dataset prefix")
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", help="a number, or `fit`: the most every layout fits "
                                         "(default: the shape's)")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--layouts", nargs="*", default=["fsdp8", "tp2-fsdp4", "tp4-pp2"],
                        choices=sorted(LAYOUTS))
    parser.add_argument("--reshard", action="store_true", help="the reshard-and-resume check")
    parser.add_argument("--gpu", help="the planner's GPU row (default: this machine's; H200 on "
                                      "CPU)")
    args = parser.parse_args()
    name = args.gpu or (torch.cuda.get_device_name() if args.device == "cuda" else "H200")
    gpu = next(g for key, g in gpus().items() if key in name)
    with tempfile.TemporaryDirectory() as work:
        (reshard_resume if args.reshard else throughput)(args, gpu, Path(work))


if __name__ == "__main__":
    main()
