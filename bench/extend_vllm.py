"""vLLM on an extended export (GPU): a model trained at 512 positions, extended ×4 to 2,048 by
each RoPE method, written by our HF export and loaded by vLLM unchanged. Its prompt
log-probabilities over positions 512…2,047 of a random 2,048-token prompt against ours (fp32),
beside the gap between ours extended and ours with plain RoPE (what a loader that ignored the
scaling would give). Run by `bash bench/gpu_generate.sh extend` after the vLLM parts are staged.

    python -m bench.extend_vllm [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch

from engine.convert.hf import write_hf
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.train.context import ContextSection, extended_config

TRAINED, LONG = 512, 2048
# head_dim 64: a size every vLLM attention backend takes
BASE = ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=4,
                   num_heads=8, num_kv_heads=4, max_position_embeddings=TRAINED, init_std=0.05)


@torch.no_grad()
def our_logprobs(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1 … len - 1."""
    logits = model(ids[None].cuda())[0].float().log_softmax(-1)
    return logits[:-1].gather(1, ids[1:, None].cuda())[:, 0].cpu()


def vllm_logprobs(folder: Path, ids: torch.Tensor, dtype: str) -> torch.Tensor:
    from vllm import LLM, SamplingParams

    llm = LLM(str(folder), skip_tokenizer_init=True, dtype=dtype, seed=0, enforce_eager=True,
              gpu_memory_utilization=0.3, max_model_len=LONG)
    (out,) = llm.generate([{"prompt_token_ids": ids.tolist()}],
                          SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
                          use_tqdm=False)
    got = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:].tolist())]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return torch.tensor(got)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    base = LlamaModel(BASE)
    base.init_weights(seed=0)
    # LONG − 1 prompt tokens: vLLM counts the one requested output token within max_model_len
    ids = torch.randint(0, BASE.vocab_size, (LONG - 1,), generator=torch.Generator().manual_seed(1))
    plain = LlamaModel(BASE.model_copy(update={"max_position_embeddings": LONG}))
    plain.load_state_dict(base.state_dict())
    plain_lp = our_logprobs(plain.cuda().eval(), ids)
    for method in ("linear", "dynamic", "yarn", "llama3"):
        cfg = extended_config(BASE, ContextSection(max_length=LONG, method=method))
        model = LlamaModel(cfg)
        model.load_state_dict(base.state_dict())
        ours = our_logprobs(model.cuda().eval(), ids)
        with tempfile.TemporaryDirectory() as folder:
            write_hf(Path(folder), model.cpu(), "fp32", 5 << 30, {})
            theirs = vllm_logprobs(Path(folder), ids, args.dtype)
        beyond = slice(TRAINED - 1, None)  # predictions of positions 512 … 2,047
        print(json.dumps({
            "method": method, "vllm_dtype": args.dtype,
            "rope_scaling": cfg.rope_scaling.model_dump(mode="json"),
            "vllm_vs_ours_max_abs": round(float((theirs - ours)[beyond].abs().max()), 6),
            "vllm_vs_ours_mean_abs": round(float((theirs - ours)[beyond].abs().mean()), 6),
            "plain_vs_ours_mean_abs": round(float((plain_lp - ours)[beyond].abs().mean()), 6),
        }), flush=True)


if __name__ == "__main__":
    main()
