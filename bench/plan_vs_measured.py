"""The planner's predictions against the GPU (docs/planner.md): peak memory
(torch.cuda.max_memory_allocated, which the training loop logs as peak_memory_gib) and step time
of real pretrain runs on one GPU, eager or with compiled blocks, beside what `engine/plan`
predicts for the same spec and what Fast-LLM's calculator (FreedomIntelligence/FastLLM,
1.pre_train_math.py) would say from its published formulas. One JSON line a configuration;
`--replay` reads such lines back and predicts again with today's planner and gpus.json (no GPU).

    python -m bench.plan_vs_measured --dataset PREFIX [--only NAME ...]   (GPU: bench/gpu_plan.sh)
    python -m bench.plan_vs_measured --replay LOG
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from engine.model.config import ModelConfig
from engine.plan.estimate import estimate
from engine.plan.memory import GIB
from engine.plan.timing import gpus
from engine.train.spec import PretrainSpec

SHAPES = {  # vocab hidden ffn layers heads kv-heads
    "1.1b": (32000, 2048, 5632, 22, 32, 4),
    "3b": (128256, 3072, 8192, 28, 24, 8),
    "8b": (128256, 4096, 14336, 32, 32, 8),
}
CONFIGS = {  # name: (shape, seq, micro-batch, recompute, data parallel*, compiled blocks[, spec])
    # *ddp, fsdp, or fsdp-offload (FSDP with cpu_offload); spec: more of the training spec's fields
    "1.1b-2k-none-mb4": ("1.1b", 2048, 4, "none", "ddp", False),
    "1.1b-2k-selective-mb8": ("1.1b", 2048, 8, "selective", "ddp", False),
    "1.1b-2k-full-mb8": ("1.1b", 2048, 8, "full", "ddp", False),
    "1.1b-8k-selective-mb1": ("1.1b", 8192, 1, "selective", "ddp", False),
    "1.1b-8k-full-mb2-fsdp": ("1.1b", 8192, 2, "full", "fsdp", False),
    "3b-2k-selective-mb2": ("3b", 2048, 2, "selective", "ddp", False),
    "3b-2k-none-mb1-fsdp": ("3b", 2048, 1, "none", "fsdp", False),
    "3b-8k-full-mb1": ("3b", 8192, 1, "full", "ddp", False),
    "1.1b-4k-selective-mb4-compiled": ("1.1b", 4096, 4, "selective", "ddp", True),
    "3b-4k-full-mb4-compiled": ("3b", 4096, 4, "full", "ddp", True),
    "8b-4k-full-mb1-fsdp-compiled": ("8b", 4096, 1, "full", "fsdp", True),
    "8b-4k-selective-mb1-bf16-compiled": ("8b", 4096, 1, "selective", "ddp", True,
                                          {"precision": "bf16"}),
    "8b-4k-selective-mb1-bf16-float8-compiled": ("8b", 4096, 1, "selective", "ddp", True,
                                                 {"precision": "bf16",
                                                  "float8": {"recipe": "tensorwise"}}),
    "3b-4k-full-mb8-offload-compiled": ("3b", 4096, 8, "full", "fsdp-offload", True),
}
ITERS = 6


def spec(name: str, dataset: str, save: str) -> dict:
    shape, seq, mb, recompute, dp, compiled, *more = CONFIGS[name]
    v, h, f, layers, heads, kv = SHAPES[shape]
    return {"model": {"vocab_size": v, "hidden_size": h, "intermediate_size": f,
                      "num_layers": layers, "num_heads": heads, "num_kv_heads": kv,
                      "max_position_embeddings": max(seq, 4096)},
            "data": {"blend": [dataset], "split": "99,1,0", "seq_length": seq},
            "checkpoint": {"save": save}, "iters": ITERS, "log_interval": 3,
            "micro_batch_size": mb, "global_batch_size": mb, "recompute": recompute,
            "data_parallel": dp.removesuffix("-offload"), "cpu_offload": dp.endswith("-offload"),
            "compile": compiled, "optim": {"lr": 1e-4, "warmup_iters": 1},
            "eval": {"interval": None}, **(more[0] if more else {})}


def fast_llm_gib(model: dict, seq: int, micro_batch: int, recompute: str) -> float:
    """Fast-LLM's estimate for one GPU (ZeRO over one rank): 16 bytes a parameter (bf16
    weights and gradients, fp32 master and two moments) for a model of L·(12h² + 6h) + (V + s)·h
    + h parameters — GPT's block: no SwiGLU third matrix, no grouped-query attention, a tied
    head — and 2 bytes for each of b·s·h inputs and b·s·h·11·L activations (a third of those
    with checkpointing; nothing for selective recompute, which it does not know)."""
    h, layers, v = model["hidden_size"], model["num_layers"], model["vocab_size"]
    params = layers * (12 * h * h + 6 * h) + (v + seq) * h + h
    activations = micro_batch * seq * h * 11 * layers / (3 if recompute == "full" else 1)
    return (16 * params + 2 * (micro_batch * seq * h + activations)) / GIB


def measure(config: dict, work: Path) -> dict:
    """The last window's figures of the run (peak memory, tokens/s, TFLOP/s, MFU); it is stopped
    before its final save (a 3B checkpoint takes minutes to write)."""
    path = work / "spec.yaml"
    path.write_text(yaml.safe_dump(config))
    log = work / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "engine", "pretrain", "--config",
                                 str(path)], stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None and f"iter {ITERS}/{ITERS}" not in log.read_text():
            subprocess.run(["sleep", "1"])
        proc.kill()
        proc.wait()
    text = log.read_text()
    last = [line for line in text.splitlines() if f"iter {ITERS}/{ITERS}" in line]
    if not last:
        return {"error": text[-1500:]}
    figures = dict(re.findall(r"(\w+) ([\d.e+-]+)", last[0].split("|", 1)[1].replace("|", " ")))
    return {"peak_gib": float(figures["peak_memory_gib"]),
            "tokens_per_s": float(figures["tokens_per_s"]),
            "tflops_per_gpu": float(figures["tflops_per_gpu"]), "mfu": float(figures["mfu"])}


def compare(config: str, gpu_name: str, measured: dict) -> dict:
    """One result line: the measured figures beside today's prediction for the same spec."""
    data = spec(config, "dataset", "ckpt")
    train = PretrainSpec.model_validate(data)
    gpu = next(g for key, g in gpus().items() if key in gpu_name)
    predicted = estimate(ModelConfig.model_validate(data["model"]), train, 1, gpu, 1)
    tokens = train.global_batch_size * train.data.seq_length
    return {"config": config, "gpu": gpu_name, "precision": train.precision, **measured,
            "predicted_gib": round(predicted.memory.total / GIB, 2),
            "predicted_by_category_gib": {k: round(v / GIB, 2)
                                          for k, v in predicted.memory.as_dict().items()},
            "predicted_tokens_per_s": round(tokens / predicted.timing.step_s),
            "fast_llm_gib": round(fast_llm_gib(data["model"], train.data.seq_length,
                                               train.micro_batch_size, train.recompute), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", help="a token dataset prefix (to measure)")
    parser.add_argument("--only", nargs="*", default=list(CONFIGS))
    parser.add_argument("--replay", type=Path, help="result lines to predict again")
    args = parser.parse_args()
    if args.replay:
        for line in args.replay.read_text().splitlines():
            old = json.loads(line)
            measured = {k: old[k] for k in ("peak_gib", "tokens_per_s", "tflops_per_gpu", "mfu",
                                            "error") if k in old}
            print(json.dumps(compare(old["config"], old["gpu"], measured)))
        return
    if not args.dataset:
        parser.error("--dataset is required to measure")
    import torch

    for config in args.only:
        with tempfile.TemporaryDirectory() as work:
            measured = measure(spec(config, args.dataset, f"{work}/ckpt"), Path(work))
        print(json.dumps(compare(config, torch.cuda.get_device_name(), measured)), flush=True)


if __name__ == "__main__":
    main()
