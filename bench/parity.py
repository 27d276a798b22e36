"""Data- and model-parallel layouts on the GPUs of one host against one GPU: the same global
batch, the same seed, bf16 autocast over fp32 weights everywhere, the loss of every step
compared, tokens/s per GPU beside it. Every job starts through the engine's own bootstrap as a
Slurm job's tasks start it — one process per GPU with RANK, LOCAL_RANK, WORLD_SIZE and the
master's address in its environment (engine/parallel/distributed.py), no torchrun.

The noise bound is one GPU against itself with the step's micro-batches cut differently (the
same sums in another order): what bf16 rounding alone moves the loss by.

    python -m bench.parity --dataset PREFIX [--shape tinyllama-1.1b] [--iters 20]
        [--layouts one one-reordered ddp2 ddp2-no-overlap fsdp2 tp2 pp2]    (GPU: gpu_parity.sh)
    python -m bench.parity --dataset PREFIX --device cpu --shape tiny   (gloo: the script itself)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.plan_vs_measured import SHAPES

SHAPES = {**SHAPES, "tinyllama-1.1b": SHAPES["1.1b"], "llama-3.2-3b": SHAPES["3b"],
          "tiny": (512, 64, 128, 4, 4, 2)}
GLOBAL_BATCH = 8
LAYOUTS = {  # name: (GPUs, micro-batch, spec fields)
    "one": (1, 4, {}),
    "one-reordered": (1, 2, {}),
    "ddp2": (2, 4, {"data_parallel": "ddp"}),
    "ddp2-no-overlap": (2, 4, {"data_parallel": "ddp", "overlap_grad_reduce": False}),
    "fsdp2": (2, 4, {"data_parallel": "fsdp"}),
    "tp2": (2, 4, {"tensor_parallel": 2}),
    "pp2": (2, 2, {"pipeline_parallel": 2}),
}


def spec(shape: str, layout: str, args, save: Path) -> dict:
    v, h, f, layers, heads, kv = SHAPES[shape]
    _, micro, fields = LAYOUTS[layout]
    return {"model": {"vocab_size": v, "hidden_size": h, "intermediate_size": f,
                      "num_layers": layers, "num_heads": heads, "num_kv_heads": kv,
                      "max_position_embeddings": args.seq},
            "data": {"blend": [args.dataset], "split": "99,1,0", "seq_length": args.seq},
            "checkpoint": {"save": str(save)}, "iters": args.iters, "log_interval": 1,
            "micro_batch_size": micro, "global_batch_size": GLOBAL_BATCH, "precision": "bf16",
            "compile": args.device == "cuda", "device": args.device,
            "optim": {"lr": 3e-4, "warmup_iters": 2}, "eval": {"interval": None}, **fields}


def run_ranks(stage: list[str], ranks: int, log: Path, stop_when=None) -> int:
    """`python -m engine STAGE ...` as `ranks` processes of one job, each told its rank by its
    environment; the first non-zero exit status, or 0. `stop_when`, a test polled every second:
    once it holds, the ranks are killed (SIGKILL: SIGTERM would make them save a checkpoint, a
    big model's taking minutes and more disk than the machine has) and 0 is returned."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    base = {**os.environ, "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port}
    with open(log, "w") as out:
        procs = [subprocess.Popen([sys.executable, "-m", "engine", *stage],
                                  stdout=out, stderr=subprocess.STDOUT,
                                  env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
                 for r in range(ranks)]
        while stop_when and any(p.poll() is None for p in procs):
            if stop_when():
                for p in procs:
                    p.kill()
                    p.wait()
                return 0
            time.sleep(1)
        codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def records(save: Path) -> list[dict]:
    lines = (save / "metrics.jsonl").read_text().splitlines()
    return [{**r["data"], "step": r["step"]} for r in map(json.loads, lines)
            if r["kind"] == "metrics" and "loss" in r["data"]]


def measure(shape: str, layout: str, args, work: Path) -> dict:
    save = work / layout
    config = work / f"{layout}.yaml"
    config.write_text(yaml.safe_dump(spec(shape, layout, args, save)))
    ranks = LAYOUTS[layout][0]
    status = run_ranks(["pretrain", "--config", str(config)], ranks, work / f"{layout}.log")
    if status:
        return {"layout": layout, "error": (work / f"{layout}.log").read_text()[-2000:]}
    steps = records(save)
    window = steps[len(steps) // 2:]  # after compilation and warm-up
    tokens_per_s = sum(r["tokens_per_s"] for r in window) / len(window)
    return {"layout": layout, "gpus": ranks, "losses": [r["loss"] for r in steps],
            "tokens_per_s_per_gpu": round(tokens_per_s / ranks),
            "peak_memory_gib": max((r.get("peak_memory_gib", 0.0) for r in steps), default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", required=True, help="a token dataset prefix")
    parser.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for layout in args.layouts:
            results[layout] = measure(args.shape, layout, args, Path(work))
            reference = results.get("one")
            row = dict(results[layout])
            if reference and "losses" in row and "losses" in reference:
                gaps = [abs(a - b) for a, b in zip(row["losses"], reference["losses"])]
                row["max_loss_gap"] = round(max(gaps), 5)
                row["per_gpu_vs_one"] = round(row["tokens_per_s_per_gpu"]
                                              / reference["tokens_per_s_per_gpu"], 3)
            print(json.dumps({"shape": args.shape, **row}), flush=True)


if __name__ == "__main__":
    main()
