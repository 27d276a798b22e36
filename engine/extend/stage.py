"""extend: a model → a native checkpoint (iteration 0) with the RoPE scaling and maximum length
of `context`, the weights unchanged, the source's tokenizer beside it. The model is built with
the new config and the largest change of its logits over the source's length is logged and
recorded (0 for linear factor 1; YaRN's temperature and interpolated low frequencies change
them, which is why YaRN models are usually trained briefly too)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from engine.atomic import check_output_free, staged_dir
from engine.convert.loading import copy_model_tokenizer, load_model
from engine.convert.native import write_native
from engine.errors import InputError
from engine.extend.spec import Spec, input_paths
from engine.lineage import stage_fingerprint
from engine.manifest import Manifest, complete, sha256_file, write_manifest
from engine.model.llama import LlamaModel
from engine.train.context import extended_config, original_length

log = logging.getLogger(__name__)
_FROM_SAVE = ("files", "iteration", "world_size", "has_optimizer", "layout", "resharded_from")


def run(spec: Spec) -> Manifest:
    started = time.perf_counter()
    out = Path(spec.output)
    fp, inputs = stage_fingerprint("extend", spec, input_paths(spec))
    done = complete(out)
    if done is not None and done.fingerprint == fp:
        log.info("extend already finished: %s holds it; nothing to do", out)
        return done
    check_output_free(out)
    cfg, model, meta, source = load_model(spec.input)
    try:
        target = extended_config(cfg, spec.context)
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from None
    extended = LlamaModel(target).eval()
    extended.load_state_dict(model.state_dict())
    drift = _logit_drift(model, extended, cfg.max_position_embeddings, cfg.vocab_size)
    lengths = [original_length(cfg), spec.context.max_length]
    log.info("extended %s: %d -> %d positions (%s); max |logit change| over %d positions %.3g",
             source, *lengths, target.rope_scaling.type, cfg.max_position_embeddings, drift)
    out_meta = {**{k: v for k, v in meta.items() if k not in _FROM_SAVE},
                "extended_from": {"path": str(source), "iteration": meta.get("iteration"),
                                  "model": cfg.model_dump(mode="json")}}
    with staged_dir(out) as tmp:
        write_native(tmp, extended, target, out_meta)
        copy_model_tokenizer(source, tmp)
        summary = {"max_length": lengths,
                   "rope_scaling": target.rope_scaling.model_dump(mode="json"),
                   "max_abs_logit_change": drift,
                   "seconds": round(time.perf_counter() - started, 3)}
        files = {str(p.relative_to(tmp)): sha256_file(p)
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = Manifest(kind="checkpoint", stage="extend", inputs=inputs, fingerprint=fp,
                            spec=spec.model_dump(mode="json"), summary=summary, files=files)
        write_manifest(tmp, manifest)
    return manifest


@torch.no_grad()
def _logit_drift(before: LlamaModel, after: LlamaModel, length: int, vocab: int) -> float:
    """The largest logit change on one random sequence of the source's length."""
    ids = torch.randint(0, vocab, (1, min(length, 2048)), generator=torch.Generator().manual_seed(0))
    return float((after(ids) - before(ids)).abs().max())
