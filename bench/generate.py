"""Generation throughput: our engine's generator vs Hugging Face `generate` (and vLLM called
directly, when it imports), random weights, fixed-length outputs (ignore_eos), temperature 0.7,
top-p 0.9, a seed per prompt. Counts generated tokens only.

    python -m bench.generate --shape tinyllama-1.1b --prompts 1024 --backends ours hf vllm
    python -m bench.generate --tiny                  # CPU check: a tiny model, 8 prompts
    python -m bench.generate --verify                # GPU check: CUDA graphs vs eager vs HF, fp32
    python -m bench.generate --save-teacher DIR --tokenizer TOKDIR  # a random HF teacher for
                                                     # `python -m engine synthesize`

Prints one JSON line per backend: prompts, new tokens, seconds, generated tokens/s, peak memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.train_step import SHAPES as TRAIN_SHAPES
from engine.generate.generator import Generator
from engine.generate.params import SamplingParams
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel

SHAPES = {**TRAIN_SHAPES,
          "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=500000.0),
          "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2)}


class NoText:
    """Token ids only: the benchmark decodes no text (nor would vLLM's with detokenize off)."""

    eod_id = None

    def decode(self, ids) -> str:
        return ""


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(dtype).eval()


def prompts(args, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (args.prompts, args.prompt_len), generator=g).tolist()


def params(args) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.7, top_p=0.9, max_tokens=args.new, ignore_eos=True,
                           seed=i) for i in range(args.prompts)]


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_ours(args, cfg, device, dtype) -> dict:
    model = random_model(cfg, device, dtype)
    generator = Generator(model, NoText(), device, max_batch=args.max_batch, progress=False,
                          cuda_graphs=not args.no_graphs)
    data, settings = prompts(args, cfg.vocab_size), params(args)
    generator.generate(data[:2], settings[:2])  # warm-up
    out = []
    seconds = timed(lambda: out.extend(generator.generate(data, settings)))
    assert all(len(c[0].token_ids) == args.new for c in out)
    if args.profile:
        profile(lambda: generator.generate(data[:args.max_batch], params(args)[:args.max_batch]))
    return {"prompts": len(data), "seconds": seconds}


def profile(fn) -> None:
    """The kernels and operators that took the most device time in one more call of fn."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gpu = torch.cuda.is_available()
    with torch_profile(activities=[ProfilerActivity.CPU]
                       + [ProfilerActivity.CUDA] * gpu) as prof:
        timed(fn)
    order = "self_device_time_total" if gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=order, row_limit=25, max_name_column_width=60),
          flush=True)


def hf_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The shape as an HF transformers model with random weights."""
    import transformers

    hf_cfg = dict(cfg.to_hf())
    config = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    with torch.device(device):  # random initialisation on the GPU: minutes on CPU for 8B
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def run_hf(args, cfg, device, dtype) -> dict:
    model = hf_model(cfg, device, dtype)
    data = torch.tensor(prompts(args, cfg.vocab_size)[:args.hf_prompts], device=device)
    mask = torch.ones_like(data)

    def go():
        model.generate(data, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                       do_sample=True, temperature=0.7, top_p=0.9, top_k=0, pad_token_id=0)

    model.generate(data[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=True,
                   pad_token_id=0)
    return {"prompts": len(data), "seconds": timed(go)}


def run_vllm(args, cfg, device, dtype) -> dict:
    import tempfile

    from vllm import LLM
    from vllm import SamplingParams as VllmParams

    from engine.convert.hf import write_hf

    folder = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    write_hf(folder, random_model(cfg, device, dtype).cpu(), "bf16", 5 << 30, {})
    torch.cuda.empty_cache()  # vLLM sizes its KV cache from the memory free now
    llm = LLM(str(folder), skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              gpu_memory_utilization=0.85,
              max_model_len=args.prompt_len + args.new)
    data = [{"prompt_token_ids": p} for p in prompts(args, cfg.vocab_size)]
    settings = [VllmParams(temperature=0.7, top_p=0.9, max_tokens=args.new, ignore_eos=True,
                           seed=i, detokenize=False) for i in range(args.prompts)]
    llm.generate(data[:2], settings[:2], use_tqdm=False)
    return {"prompts": len(data), "seconds": timed(lambda: llm.generate(data, settings,
                                                                      use_tqdm=False))}


RUNS = {"ours": run_ours, "hf": run_hf, "vllm": run_vllm}


def save_teacher(args, cfg: ModelConfig) -> None:
    """The shape with random bf16 weights as an HF folder, with the tokenizer files of
    --tokenizer, its context the shape's own (2,048 for TinyLlama)."""
    import shutil

    from engine.convert.hf import write_hf

    folder = Path(args.save_teacher)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"max_position_embeddings": 2048})
    write_hf(folder, random_model(cfg, torch.device("cuda" if torch.cuda.is_available()
                                                    else "cpu"), torch.bfloat16).cpu(),
             "bf16", 5 << 30, {})
    for file in Path(args.tokenizer).iterdir():
        if file.is_file():
            shutil.copy(file, folder / file.name)


def verify(device: torch.device) -> None:
    """Greedy tokens of ragged prompts, fp32: ours with CUDA graphs, ours eager and HF generate
    must agree; and seeded sampling with and without graphs."""
    from engine.convert.hf import export_state_dict

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=4,
                      num_heads=8, num_kv_heads=2, max_position_embeddings=256)
    model = random_model(cfg, device, torch.float32)
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0)  # peaked logits: no near-ties between backends
    data = [torch.randint(3, 1000, (n,)).tolist() for n in range(5, 165, 10)]
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ours = {graphs: [c[0].token_ids for c in Generator(model, NoText(), device, progress=False,
                                                        cuda_graphs=graphs).generate(data, greedy)]
            for graphs in (True, False)}
    hf = hf_model(cfg, device, torch.float32)
    hf.load_state_dict(export_state_dict(model, torch.float32))
    same_hf = 0
    for prompt, tokens in zip(data, ours[True]):
        ids = torch.tensor([prompt], device=device)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                          min_new_tokens=48, do_sample=False, pad_token_id=0)
        same_hf += out[0, len(prompt):].tolist() == tokens
    sampled = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=48, ignore_eos=True, seed=3)
    draws = [[c[0].token_ids for c in Generator(model, NoText(), device, progress=False,
                                                cuda_graphs=graphs).generate(data, sampled)]
             for graphs in (True, False)]
    print(json.dumps({"verify": "cuda graphs", "prompts": len(data),
                      "greedy_graphs_eq_eager": sum(a == b for a, b in zip(*ours.values())),
                      "greedy_graphs_eq_hf": same_hf,
                      "sampled_graphs_eq_eager": sum(a == b for a, b in zip(*draws))}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="tinyllama-1.1b")
    parser.add_argument("--tiny", action="store_true", help="tiny model, 8 prompts, CPU")
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--hf-prompts", type=int, default=128, help="HF: one batch of these")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=512)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--no-graphs", action="store_true", help="ours: eager decode steps")
    parser.add_argument("--profile", action="store_true",
                        help="ours: then one batch under torch.profiler, top kernels printed")
    parser.add_argument("--verify", action="store_true", help=verify.__doc__.splitlines()[0])
    parser.add_argument("--save-teacher", metavar="DIR", help=save_teacher.__doc__.split(",")[0])
    parser.add_argument("--tokenizer", metavar="DIR", help="--save-teacher: tokenizer files")
    parser.add_argument("--backends", nargs="+", choices=RUNS, default=["ours", "hf"])
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.prompts, args.hf_prompts, args.new = "tiny", 8, 8, 32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.verify:
        return verify(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig(**SHAPES[args.shape], max_position_embeddings=args.prompt_len + args.new)
    if args.save_teacher:
        return save_teacher(args, cfg)
    for backend in args.backends:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = RUNS[backend](args, cfg, device, dtype)
        tokens = result["prompts"] * args.new
        print(json.dumps({"backend": backend, "shape": args.shape, **result,
                          "prompt_len": args.prompt_len, "new_tokens": args.new,
                          "tokens_per_s": round(tokens / result["seconds"], 1),
                          "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                          if device.type == "cuda" else None,
                          "device": torch.cuda.get_device_name() if device.type == "cuda"
                          else "cpu"}), flush=True)


if __name__ == "__main__":
    main()
