"""What the checkpoint protocol's checksums cost: save and load of a real model's checkpoint
(weights and AdamW state), with the time spent hashing (save) and verifying (load) shown apart.

    .venv/bin/python -m bench.checkpoint_io [--hidden 768 --layers 12 --vocab 32000] [--dir DIR]
    (TinyLlama-1.1B's shape: --hidden 2048 --layers 22 --ffn 5632 --kv-heads 4)
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.checkpoint import store as ckpt


class _Timed:
    """Wraps a function of the checkpoint module and adds up the seconds spent in it."""

    def __init__(self, name: str) -> None:
        self.name, self.seconds = name, 0.0
        self.inner = getattr(ckpt, name)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __enter__(self) -> "_Timed":
        setattr(ckpt, self.name, self)
        return self

    def __exit__(self, *exc) -> None:
        setattr(ckpt, self.name, self.inner)


def _model(args) -> tuple[LlamaModel, torch.optim.Optimizer, ModelConfig]:
    heads = args.hidden // 64
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.ffn or 4 * args.hidden, num_layers=args.layers,
                      num_heads=heads, num_kv_heads=args.kv_heads or heads,
                      max_position_embeddings=256)
    model = LlamaModel(cfg)
    model.init_weights(0)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randint(0, args.vocab, (1, 16))).float().mean().backward()
    optim.step()
    return model, optim, cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ffn", type=int, help="intermediate size (default 4 × hidden)")
    parser.add_argument("--kv-heads", type=int, help="KV heads (default: as many as heads)")
    parser.add_argument("--dir", help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    model, optim, cfg = _model(args)
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-")) / "run"
    try:
        start = time.perf_counter()
        with _Timed("_hash") as hashing:
            path = ckpt.save_checkpoint(root, 1, model, optim, {}, cfg.model_dump(mode="json"))
        save_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        start = time.perf_counter()
        with _Timed("_verify") as verify:
            ckpt.load_checkpoint(path, model, optim)
        load_s = time.perf_counter() - start
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"model {params / 1e6:.0f}M parameters, checkpoint {size / 2**30:.2f} GiB "
          f"(weights + AdamW moments)")
    print(f"save {save_s:.2f} s, of which hashing {hashing.seconds:.2f} s "
          f"({size / hashing.seconds / 2**30:.2f} GiB/s)")
    print(f"load {load_s:.2f} s, of which verifying {verify.seconds:.2f} s "
          f"({size / verify.seconds / 2**30:.2f} GiB/s)")


if __name__ == "__main__":
    main()
