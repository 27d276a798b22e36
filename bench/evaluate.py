"""FinEval throughput: every answered FinEval question (academic/val 3,340 + v2/val 1,151 = 4,491),
5-shot, through the evaluate stage's own prompt building and batched scorer, with a randomly
initialised 1B-class Llama (hidden 2048, 22 layers, 32 heads, 4 KV heads, FFN 5632, vocab 32000,
context 2048) and the Llama-2 tokenizer, bf16 on one GPU. Timing only: accuracy is chance.

    python -m bench.evaluate                       # GPU, the full run
    python -m bench.evaluate --tiny                # CPU check: tiny model, 2 questions a subject

Each folder's own dev/ supplies its shots. Prints questions/s and tokens/s (tokens = the lengths
of the sequences scored, padding excluded) for prompt building and scoring together, plus the
scoring alone. Needs torch, numpy, sentencepiece, tqdm, pydantic and pyyaml, nothing else.
"""

from __future__ import annotations

from pathlib import Path

import argparse
import json
import time

import torch

from bench.train_step import ATTENTION
from engine.data.tokenizer import load_tokenizer
from engine.evaluate import fineval, fineval_data
from engine.evaluate.scoring import Scorer
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel

SHAPES = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
               num_heads=32, num_kv_heads=4, max_position_embeddings=2048),
    "tiny": dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, max_position_embeddings=512),
}
FOLDERS = ("academic", "v2")


def default_data() -> Path:
    for candidate in (Path(__file__).resolve().parents[1] / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"):
        if (candidate / "fineval").is_dir():
            return candidate
    return Path(__file__).resolve().parents[2] / "shared" / "data"


class TimedScorer(Scorer):
    """The stage's scorer, also counting what it scores and how long that takes."""

    def score(self, requests, probe_ids=(), desc="score"):
        start = time.perf_counter()
        out = super().score(requests, probe_ids, desc)  # ends with a copy to the host: synced
        STATS["score_s"] += time.perf_counter() - start
        STATS["sequences"] += len(requests)
        STATS["tokens"] += sum(len(r.tokens) for r in requests)
        return out


STATS = {"score_s": 0.0, "sequences": 0, "tokens": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, 2 questions a subject "
                        "(runs on CPU in seconds)")
    parser.add_argument("--data", type=Path, default=default_data(),
                        help="folder holding fineval/ and tokenizers/llama2/")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["answer"], choices=fineval.METHODS,
                        help="answer: FinEval's protocol (default); add option for the "
                             "log-likelihood of every option (4 more sequences a question)")
    parser.add_argument("--batch-tokens", type=int, default=32768)
    parser.add_argument("--limit", type=int, default=None, help="questions per subject")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--attention", default="sdpa", choices=ATTENTION,
                        help="the model's attention_backend (flash_attn_4 needs flash-attn-4)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig(**SHAPES["tiny" if args.tiny else "1b"], attention_backend=args.attention)
    limit = args.limit or (2 if args.tiny else None)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model.to_empty(device=device)
    model.init_weights(seed=0)
    model.to(dtype).eval()
    if args.compile:
        for block in model.layers.values():
            block.compile()
    tokenizer = load_tokenizer(args.data / "tokenizers" / "llama2" / "tokenizer.model")
    scorer = TimedScorer(model, device, args.batch_tokens, progress=True)
    template = fineval.Template()

    datasets = [fineval_data.load(args.data / "fineval" / name, "val", None, None, args.shots,
                                  limit) for name in FOLDERS]
    first, data = datasets[0].subjects[0], datasets[0]  # warm-up: 4 questions, not timed
    warm = fineval_data.FinEval([first], {first.name: data.questions[first.name][:4]}, data.shots)
    fineval.evaluate(scorer, warm, template, tokenizer, tokenizer.bos_id,
                     cfg.max_position_embeddings, [args.shots], args.methods)
    STATS.update(score_s=0.0, sequences=0, tokens=0)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    questions, truncated, accuracy = 0, 0, {}
    for name, data in zip(FOLDERS, datasets):
        result = fineval.evaluate(scorer, data, template, tokenizer, tokenizer.bos_id,
                                  cfg.max_position_embeddings, [args.shots], args.methods)
        questions += len(result.questions)
        for r in result.records:
            if r["level"] == "overall":
                truncated += r["prompts_truncated"]
                accuracy[f"{name}/{r['method']}"] = round(r["accuracy"], 4)
    total = time.perf_counter() - start

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    params = sum(p.numel() for p in model.parameters())
    print(f"device {name}, {dtype}, model {params / 1e9:.3f}B parameters, "
          f"context {cfg.max_position_embeddings}, {args.shots}-shot, methods {args.methods}, "
          f"attention {args.attention}, compile {args.compile}")
    print(f"questions {questions}, sequences {STATS['sequences']}, tokens {STATS['tokens']:,}, "
          f"prompts truncated {truncated}")
    print(f"total {total:.1f} s: {questions / total:.1f} questions/s, "
          f"{STATS['tokens'] / total:,.0f} tokens/s")
    print(f"scoring alone {STATS['score_s']:.1f} s: {STATS['tokens'] / STATS['score_s']:,.0f} "
          f"tokens/s; prompt building {total - STATS['score_s']:.1f} s")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print("accuracy (random weights, meaningless):", json.dumps(accuracy))


if __name__ == "__main__":
    main()
