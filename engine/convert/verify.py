"""The check that ends every conversion: source and result, each loaded from disk the way its
consumer loads it, compute logits on one fixed batch in fp32 on the CPU, and must agree.

- HF folders are run by transformers' AutoModelForCausalLM when it is importable (the consumer
  the folder is for, and an implementation independent of ours); by our own model otherwise.
- A bf16 / fp16 result is compared with the source *rounded to that dtype*, both computed in fp32:
  rounding is what the user asked for, anything beyond it is a conversion error. So one tolerance
  serves every dtype: 1e-4 max |logit difference|, the headroom for two fp32 implementations
  summing in different orders (a correct conversion run by the same implementation gives 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.convert.hf import load_hf
from engine.convert.megatron_formats import load_megatron_source
from engine.convert.native import load_native
from engine.convert.spec import TOLERANCE
from engine.errors import LmforgeError
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel

BATCH, SEQ, SEED = 2, 64, 0


class VerificationError(LmforgeError):
    """The converted model does not compute what its source computes."""


def fixed_batch(cfg: ModelConfig) -> torch.Tensor:
    """Seeded random token ids over the whole vocabulary, [2, min(64, max positions)]."""
    seq = min(SEQ, cfg.max_position_embeddings)
    return torch.randint(0, cfg.vocab_size, (BATCH, seq),
                         generator=torch.Generator().manual_seed(SEED))


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        return None
    return transformers


@torch.no_grad()
def our_logits(model: LlamaModel, ids: torch.Tensor, cast: torch.dtype | None) -> torch.Tensor:
    """Logits of our model in fp32, its weights rounded to `cast` first (in place: the model is
    not used after verification)."""
    if cast is not None:
        for param in model.parameters():
            param.copy_(param.to(cast))
    return model(ids).float()


@torch.no_grad()
def transformers_logits(folder: Path, ids: torch.Tensor, cast: torch.dtype | None,
                        check_loading: bool) -> torch.Tensor | None:
    """Logits of an HF folder run by transformers in fp32 (weights rounded to `cast`); None when
    transformers is not importable. `check_loading`: fail on any missing, unexpected or
    mismatched tensor (transformers would fill a missing one at random and only warn)."""
    transformers = _transformers()
    if transformers is None:
        return None
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=cast or torch.float32, output_loading_info=True)
    problems = {key: sorted(map(str, info.get(key) or ()))
                for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {key: names for key, names in problems.items() if names}
    if check_loading and problems:
        raise VerificationError(f"transformers loads {folder} with {problems}")
    return model.float().eval()(ids, use_cache=False).logits.float()


def runner_name(hf_side: bool, by_transformers: bool) -> str:
    if by_transformers:
        return f"transformers {_transformers().__version__} AutoModelForCausalLM"
    return "lmforge LlamaModel" + (" (transformers not importable)" if hf_side else "")


def compare(reference: torch.Tensor, result: torch.Tensor, tolerance: float) -> dict[str, Any]:
    """max / mean |difference|; raises VerificationError over tolerance or on non-finite logits."""
    if reference.shape != result.shape:
        raise VerificationError(f"logits of shape {tuple(result.shape)}, source gives "
                                f"{tuple(reference.shape)}")
    diff = (reference.double() - result.double()).abs()
    report = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
              "max_abs_logit": reference.abs().max().item(), "tolerance_max_abs": tolerance}
    if not torch.isfinite(diff).all() or report["max_abs_diff"] > tolerance:
        raise VerificationError(
            f"converted model's logits differ from the source's by up to "
            f"{report['max_abs_diff']:.3g} (mean {report['mean_abs_diff']:.3g}, tolerance "
            f"{tolerance:g})")
    return report


def load_result(fmt: str, folder: Path) -> LlamaModel:
    """A conversion's result, read back from disk by the reader of its format."""
    if fmt == "hf":
        return load_hf(folder)[2]
    if fmt == "native":
        return load_native(folder)[1]
    return load_megatron_source(fmt, folder)[1]


def verify(source_format: str, source: Path, source_model: LlamaModel, target_format: str,
           result: Path, cast: torch.dtype | None, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Run source and result on the fixed batch and compare; the summary for the manifest.
    `source_model` (the source as we loaded it) runs the source unless transformers does."""
    ids = fixed_batch(source_model.cfg)
    reference = logits = None
    if source_format == "hf":
        reference = transformers_logits(source, ids, cast, check_loading=False)
    source_by_tf = reference is not None
    if reference is None:
        reference = our_logits(source_model, ids, cast)
    if target_format == "hf":
        logits = transformers_logits(result, ids, None, check_loading=True)
    result_by_tf = logits is not None
    if logits is None:
        model = load_result(target_format, result)
        logits = our_logits(model, ids, None)
    report = compare(reference, logits, tolerance)
    return {"reference": {"source": runner_name(source_format == "hf", source_by_tf),
                          "result": runner_name(target_format == "hf", result_by_tf)},
            "batch": list(ids.shape), "seed": SEED, "computed_in": "fp32",
            "source_rounded_to": str(cast).removeprefix("torch.") if cast else None, **report}
