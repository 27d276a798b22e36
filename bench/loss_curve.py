"""The optimised training path learns what the plain one learns: the engine's own pretrain stage,
from the same initialisation on the same batches, with its defaults (compiled blocks, fused
chunked head + cross-entropy; `--attention flash_attn_4` for FlashAttention-4 there) and plain
(eager blocks, fp32 cross-entropy over full logits, SDPA), or with one of the two changed; all
with `precision: bf16` (autocast over fp32 weights and optimizer state) but `optimised-master`
(the optimised path with `bf16-master`: bf16 weights, fp32 masters in the optimizer).
Prints the loss curves side by side, their differences, and each run's tokens/s as the training
loop logged it.

    python -m bench.loss_curve --corpus corpus.jsonl --tokenizer tokenizer.model --iters 300
    python -m bench.loss_curve --replay FOLDER     (RUN.jsonl metrics of runs made before)

Tokenizes the corpus with the engine first (the engine's tokenize stage).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
from pathlib import Path

import torch
import torch._inductor.config as inductor

from bench.train_step import ATTENTION, SHAPES
from engine.data import tokenize
from engine.model.config import ModelConfig
from engine.train import build, pretrain
from engine.train.master_adamw import norm_gains


# name -> (compiled blocks, fused chunked head + cross-entropy, numerics probe, precision,
# float8 recipe)
RUNS = {"optimised": (True, True, None, "bf16", None),
        "plain": (False, False, None, "bf16", None),
        "optimised-master": (True, True, None, "bf16-master", None),
        # a probe: bf16-master with the LM head also kept fp32 (its gradient never rounded to bf16)
        "optimised-master-fp32-head": (True, True, "fp32-head", "bf16-master", None),
        "compiled-full-logits": (True, False, None, "bf16", None),
        "eager-fused": (False, True, None, "bf16", None),
        # a probe of where the optimised and plain paths part: inductor made to round to bf16
        # wherever eager would
        "optimised-eager-rounding": (True, True, "eager-rounding", "bf16", None),
        # the blocks' matmuls in float8 (torchao), first and last block in bf16
        "optimised-master-float8-tensorwise": (True, True, None, "bf16-master", "tensorwise"),
        "optimised-master-float8-rowwise": (True, True, None, "bf16-master", "rowwise")}


def _gains_and_head(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return norm_gains(model) + [p for n, p in model.named_parameters() if n.endswith("lm_head.weight")]


@contextlib.contextmanager
def probe(name: str | None):
    saved = inductor.emulate_precision_casts, build.norm_gains
    inductor.emulate_precision_casts = name == "eager-rounding"
    if name == "fp32-head":  # what the training loop keeps fp32 under bf16-master
        build.norm_gains = _gains_and_head
    torch._dynamo.reset()  # compile again under this setting
    try:
        yield
    finally:
        inductor.emulate_precision_casts, build.norm_gains = saved
        torch._dynamo.reset()


def train(name: str, work: Path, prefix: str, args, compiled: bool, fused: bool,
          numerics_probe: str | None, precision: str, float8: str | None) -> list[dict]:
    save = work / name
    shutil.rmtree(save, ignore_errors=True)
    spec = pretrain.Spec(
        model=ModelConfig(**SHAPES[args.shape], max_position_embeddings=args.seq,
                          attention_backend=args.attention if compiled else "sdpa"),
        data={"blend": [prefix], "split": "99,1,0", "seq_length": args.seq},
        checkpoint={"save": str(save), "keep_last": 1},
        optim={"lr": args.lr, "min_lr": args.lr / 10, "warmup_iters": args.iters // 10},
        iters=args.iters, micro_batch_size=args.micro_batch, global_batch_size=args.micro_batch,
        precision=precision, compile=compiled, fused_loss=fused, log_interval=args.log_interval,
        float8={"recipe": float8} if float8 else None, seed=1234)
    with probe(numerics_probe):
        pretrain.run(spec)
    for checkpoint in save.glob("iter_*"):  # two 3B ones do not fit the GPU machine's disk
        shutil.rmtree(checkpoint)
    return read_curve(save / "metrics.jsonl")


def read_curve(metrics: Path) -> list[dict]:
    """The training loop's logged windows (loss, tokens/s, MFU) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [{"step": r["step"], **r["data"]} for r in rows
            if r["kind"] == "metrics" and "loss" in r["data"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", help="JSONL with a 'text' field")
    p.add_argument("--tokenizer")
    p.add_argument("--work", default="/tmp/lmforge-loss-curve")
    p.add_argument("--shape", choices=SHAPES, default="tinyllama-1.1b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--attention", default="sdpa", choices=ATTENTION,
                   help="attention backend of the runs with compiled blocks (the eager ones keep SDPA)")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=["optimised", "plain"],
                   help="the first is compared with each of the others")
    p.add_argument("--replay", type=Path, help="a folder of RUN.jsonl metrics (bench/gpu_perf.sh "
                   "copies them as curve-RUN.jsonl): report them, train nothing")
    args = p.parse_args()
    if args.replay:
        report({f.stem.removeprefix("curve-"): read_curve(f)
                for f in sorted(args.replay.glob("*.jsonl"))})
        return
    if not (args.corpus and args.tokenizer):
        p.error("--corpus and --tokenizer are needed to train")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prefix = str(work / "data" / "corpus")
    tokenize.run(tokenize.Spec(input=[args.corpus], output_prefix=prefix, tokenizer=args.tokenizer,
                               append_eod=True, workers=8, progress=False))
    prefix += "_text_document"
    report({name: train(name, work, prefix, args, *RUNS[name]) for name in args.runs})


def report(curves: dict[str, list[dict]]) -> None:
    """The curves side by side, each later one's difference from the first, and their rates."""
    runs = list(curves)
    first, others = runs[0], runs[1:]
    print(f"\n| iteration | {' | '.join(runs)} | " + " | ".join(f"{first} − {o}" for o in others) + " |")
    print("|---:|" + "---:|" * (len(runs) + len(others)))
    diffs: dict[str, list[float]] = {o: [] for o in others}
    for rows in zip(*(curves[n] for n in runs)):
        for o, row in zip(others, rows[1:]):
            diffs[o].append(rows[0]["loss"] - row["loss"])
        print(f"| {rows[0]['step']} | " + " | ".join(f"{r['loss']:.4f}" for r in rows) + " | "
              + " | ".join(f"{diffs[o][-1]:+.4f}" for o in others) + " |")
    for o, d in diffs.items():
        late = d[len(d) // 2:]
        print(f"\n{first} − {o}: largest |difference| {max(map(abs, d)):.4f}; mean over the second "
              f"half {statistics.mean(late):+.4f} (sd {statistics.pstdev(late):.4f})")
    for name, rows in curves.items():
        tps = [r["tokens_per_s"] for r in rows[1:]]  # the first window holds compilation
        mfu = [r["mfu"] for r in rows[1:] if "mfu" in r]
        print(f"{name}: median {statistics.median(tps):,.0f} tokens/s"
              + (f", MFU {statistics.median(mfu):.1%}" if mfu else "") + " (training loop's log)")


if __name__ == "__main__":
    main()
