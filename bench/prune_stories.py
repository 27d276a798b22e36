"""Importance vs random pruning on the real stories260K model (docs/pruning.md): held-out loss of
each method right after pruning to about half the non-embedding parameters, by width and by
depth, and after the same short recovery by distillation from the parent or by plain
cross-entropy. In-domain text is the model's own samples (TinyStories-style stories from BOS).

    python -m bench.prune_stories --work /tmp/prune-stories [--stories 1600] [--iters 150]

Reads ../shared/data/tiny-llama/hf (a benchmark, not the project, may). CPU, ~10 minutes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from engine.convert import stage as convert
from engine.convert.native import load_native
from engine.data import tokenize
from engine.data.tokenizer import load_tokenizer
from engine.generate.generator import Generator
from engine.generate.params import SamplingParams
from engine.prune import spec as prune_spec
from engine.prune import stage as prune
from engine.prune.calibration import calibration_tokens
from engine.prune.importance import calibration_loss
from engine.train.loop import train
from engine.train.spec import FinetuneSpec

HF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiny-llama" / "hf"
WIDTH = {"hidden_size": 56, "num_kv_heads": 2, "intermediate_size": 100}  # 49% of non-embedding
DEPTH = {"num_layers": 3}                                                 # 60% of non-embedding
SEEDS = (0, 1, 2)


def stories(parent: Path, count: int, work: Path) -> dict[str, Path]:
    """The parent's own samples from BOS, split into calibration / held-out / training JSONL."""
    _, model, _, _ = load_native(parent)
    tok = load_tokenizer(parent / "tokenizer")
    gen = Generator(model, tok, torch.device("cpu"), progress=False)
    params = [SamplingParams(temperature=1.0, max_tokens=255, seed=i) for i in range(count)]
    texts = [c[0].text for c in gen.generate([[tok.bos_id]] * count, params)]
    splits = {"calibration": texts[:256], "heldout": texts[256:384], "train": texts[384:]}
    out = {}
    for name, rows in splits.items():
        out[name] = work / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    tokenize.run(tokenize.Spec(input=[str(out["train"])], output_prefix=str(work / "train"),
                               tokenizer=str(parent / "tokenizer" / "tokenizer.model"),
                               add_bos=True, progress=False))
    out["dataset"] = work / "train_text_document"
    return out


def heldout_tokens(parent: Path, heldout: Path) -> torch.Tensor:
    """The held-out stories as the stage packs calibration data: 128 sequences of 256 tokens."""
    return calibration_tokens(str(heldout), parent / "iter_0000000", 512, 128, 255)


def loss_of(checkpoint: Path, tokens: torch.Tensor) -> float:
    _, model, _, _ = load_native(checkpoint)
    return calibration_loss(model, tokens, 32)


def variants() -> dict[str, dict]:
    out = {"width/activation": {**WIDTH, "method": "activation"},
           "width/activation, norms not rescaled": {**WIDTH, "rescale_norms": False},
           "width/magnitude": {**WIDTH, "method": "magnitude"},
           "depth/block-importance": {**DEPTH, "depth_method": "block-importance"},
           "depth/ppl": {**DEPTH, "depth_method": "ppl"}}
    for seed in SEEDS:
        out[f"width/random-{seed}"] = {**WIDTH, "method": "random", "seed": seed}
        out[f"depth/random-{seed}"] = {"drop_layers": sorted(random.Random(seed).sample(range(5), 2))}
    out["depth/cookbook (1, 3)"] = {"drop_layers": [1, 3]}  # its advice: middle, spread apart
    return out


def recover(pruned: Path, parent: Path, dataset: Path, save: Path, iters: int, kd: bool) -> None:
    spec = {"load": str(pruned), "data": {"blend": [str(dataset)], "seq_length": 256,
                                          "split": "100,0,0"},
            "checkpoint": {"save": str(save), "interval": iters}, "iters": iters,
            "global_batch_size": 16, "micro_batch_size": 16, "precision": "fp32",
            "device": "cpu", "optim": {"lr": 2e-3, "warmup_iters": 10, "min_lr": 2e-4}}
    if kd:
        spec["distill"] = {"teacher": str(parent), "alpha": 0.0}
    train(FinetuneSpec.model_validate(spec), "finetune")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/prune-stories"))
    ap.add_argument("--stories", type=int, default=1600)
    ap.add_argument("--iters", type=int, default=150)
    args = ap.parse_args()
    torch.manual_seed(0)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    parent = work / "parent"
    if not parent.exists():
        convert.run(convert.Spec(load_dir=str(HF), save_dir=str(parent), source_format="hf",
                                 target_format="native"))
    data = stories(parent, args.stories, work)
    heldout = heldout_tokens(parent, data["heldout"])
    results = {"parent": {"pruned": loss_of(parent, heldout)}}
    for name, targets in variants().items():
        out = work / "".join(c for c in name.replace("/", "_") if c.isalnum() or c in "_-")
        if not out.exists():
            prune.run(prune_spec.Spec(input=str(parent), output=str(out),
                                      calibration=str(data["calibration"]),
                                      calibration_samples=128, seq_length=255,
                                      progress=False, **targets))
        row = {"pruned": loss_of(out, heldout)}
        for kd in (True, False):
            save = work / f"{out.name}-{'kd' if kd else 'ce'}"
            if not save.exists():
                recover(out, parent, data["dataset"], save, args.iters, kd)
            row["kd" if kd else "ce"] = loss_of(save, heldout)
        results[name] = row
        print(name, json.dumps(row), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
