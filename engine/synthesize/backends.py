"""Two generation backends behind one call, `generate(prompts, params) -> [[Completion]]` (one
list of n per prompt): lmforge's own generator (engine.generate.generator) and vLLM's offline
`LLM`. `choose` resolves `auto` on the node that runs the job."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Protocol, Sequence

import torch

from engine.convert.hf import read_config
from engine.data.tokenizer import Tokenizer
from engine.errors import InputError
from engine.evaluate.source import Source
from engine.formats import model_format
from engine.generate.params import Completion, SamplingParams
from engine.model.config import DynamicScaling, ModelConfig
from engine.synthesize.spec import Spec

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class Backend(Protocol):
    name: str

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 desc: str) -> list[list[Completion]]: ...


def choose(spec: Spec, device: torch.device) -> str:
    """The backend `spec.backend` names; auto: vllm where it imports and a GPU is present."""
    if spec.backend != "auto":
        return spec.backend
    if device.type == "cuda" and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "engine"


class EngineBackend:
    """lmforge's generator on the teacher loaded by engine.evaluate.source."""

    name = "engine"

    def __init__(self, source: Source, tok: Tokenizer, spec: Spec, device: torch.device) -> None:
        from engine.generate.generator import Generator

        dtype = _DTYPES.get(spec.dtype) or (torch.bfloat16 if device.type == "cuda"
                                            else torch.float32)
        model = source.model.to(device=device, dtype=dtype).eval()
        self.generator = Generator(model, tok, device, max_batch_tokens=spec.max_batch_tokens,
                                   progress=spec.progress)

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 desc: str) -> list[list[Completion]]:
        return self.generator.generate(prompts, list(params), desc=desc)


def hf_config(teacher: str) -> ModelConfig:
    """An HF teacher's config alone (the vllm backend never loads the weights here), refused
    where vLLM would not compute what the model computes."""
    path = Path(teacher)
    if model_format(path) != "hf":
        raise InputError(f"{teacher}: the vllm backend loads HF model folders; convert the "
                         f"native checkpoint first (stage convert), or use backend engine")
    try:
        cfg = ModelConfig.from_hf(read_config(path))
    except ValueError as exc:  # InputError included
        raise InputError(f"{path / 'config.json'}: {exc}") from None
    if isinstance(cfg.rope_scaling, DynamicScaling):
        # vLLM's rotary cache has max_position_embeddings rows while it admits that length ×
        # the factor: later positions read past the cache (NaN), and its base is plain RoPE's
        raise InputError(f"{path / 'config.json'}: rope_scaling type dynamic: vLLM does not "
                         f"run dynamic NTK as transformers defines it (positions past "
                         f"max_position_embeddings {cfg.max_position_embeddings} give NaN); use "
                         f"backend engine, or extend with yarn, linear or llama3")
    return cfg


class VllmBackend:
    """vLLM's offline API: `LLM(model=...)`, `LLM.generate` on token-id prompts
    (`{"prompt_token_ids": ids}`, a TokensPrompt) with one `vllm.SamplingParams` per prompt;
    tensor parallel over `tensor_parallel_size` GPUs of this rank."""

    name = "vllm"

    def __init__(self, spec: Spec) -> None:
        _rank_gpus(spec.tensor_parallel_size)
        # the stage has used CUDA by now (device choice): a forked engine process could not
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        import vllm

        self.vllm = vllm
        self.progress = spec.progress
        self.llm = vllm.LLM(model=spec.teacher, tokenizer=_tokenizer_folder(spec),
                            tensor_parallel_size=spec.tensor_parallel_size,
                            dtype=_VLLM_DTYPES[spec.dtype], seed=spec.seed,
                            gpu_memory_utilization=spec.gpu_memory_utilization)

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 desc: str) -> list[list[Completion]]:
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, [self._params(p) for p in params],
                                    use_tqdm=self.progress)
        return [[_completion(o, len(r.prompt_token_ids)) for o in r.outputs] for r in outputs]

    def _params(self, p: SamplingParams):
        fields = p.model_dump(exclude={"logprobs"})
        # ours: the sampled token's log-probability or none; vLLM's: that many top tokens besides
        return self.vllm.SamplingParams(**fields, logprobs=0 if p.logprobs else None)


def _rank_gpus(tp: int) -> None:
    """This rank's `tp` GPUs of the node (local rank r: the r-th group of tp), as the only ones
    vLLM sees: every rank's engine would otherwise start on the node's first GPUs. vLLM's engine
    process, started after this, reads CUDA_VISIBLE_DEVICES afresh."""
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    first = int(local) * tp
    mine = devices[first:first + tp]
    if len(mine) < tp:
        raise InputError(f"local rank {local} needs GPUs {first}-{first + tp - 1} "
                         f"(tensor_parallel_size {tp}), the node shows {len(devices)}: run "
                         f"{len(devices) // tp} rank(s) per node")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)


def _tokenizer_folder(spec: Spec) -> str:
    """vLLM loads a tokenizer by folder (transformers' AutoTokenizer): the teacher's, or the
    folder of the one given."""
    if spec.tokenizer is None:
        return spec.teacher
    path = Path(spec.tokenizer)
    return str(path.parent if path.is_file() else path)


def _completion(out, prompt_tokens: int) -> Completion:
    """vLLM's CompletionOutput as ours."""
    logprobs = None
    if out.logprobs is not None:
        logprobs = [step[token].logprob for step, token in zip(out.logprobs, out.token_ids)]
    return Completion(token_ids=list(out.token_ids), text=out.text,
                      finish_reason="length" if out.finish_reason == "length" else "stop",
                      stop_reason=out.stop_reason, logprobs=logprobs, prompt_tokens=prompt_tokens)
