"""evaluate: perplexity, FinEval, LAMBADA and WikiText scores of a model in report.json + .md.

The model is an HF folder or a native checkpoint; a suite runs when its data is given; the report
is an artifact of kind eval-report. Data-parallel when WORLD_SIZE > 1: every rank loads the model,
scores its share of the sequences, results are summed over ranks, and rank 0 writes the report
(other ranks return None).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engine.atomic import check_output_free, staged_dir
from engine.errors import InputError
from engine.evaluate import fineval, fineval_data, lambada, passkey, ppl, wikitext
from engine.evaluate.report import headline_metrics, write_documents, write_report
from engine.evaluate.scoring import Scorer
from engine.evaluate.source import Source, load_source
from engine.evaluate.spec import Spec, input_paths, parse_window
from engine.lineage import stage_fingerprint
from engine.manifest import Manifest, sha256_file, write_manifest
from engine.model.config import DynamicScaling, NoScaling
from engine.parallel import distributed

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _check_paths(spec: Spec) -> None:
    """Fail on a missing input before the model is loaded."""
    paths = [*(spec.ppl or []), spec.fineval, spec.lambada, spec.wikitext, spec.fineval_mapping]
    for path in filter(None, paths):
        if not Path(path).exists() and not Path(f"{path}.idx").exists():
            raise InputError(f"{path}: no such file or folder")


def run(spec: Spec) -> Manifest | None:
    out = Path(spec.output)
    check_output_free(out)
    _check_paths(spec)
    source = load_source(spec.load_dir, spec.tokenizer)  # before any process group: no collectives
    owns_group = not dist.is_initialized()
    env = distributed.setup(spec.device)
    per_document = [] if spec.per_document else None
    try:
        report = evaluate(spec, source, env, per_document)
    finally:
        if owns_group:
            distributed.teardown()
    if not env.is_main:
        return None
    with staged_dir(out) as tmp:
        files = write_report(tmp, report)
        if per_document is not None:
            files.append(write_documents(tmp, per_document))
        fp, inputs = stage_fingerprint("evaluate", spec, input_paths(spec))
        finite = {k: v for k, v in report["metrics"].items() if math.isfinite(v)}
        summary = {"model": report["model"]["name"], "metrics": finite,
                   "timing_s": report["timing_s"]}
        manifest = Manifest(kind="eval-report", stage="evaluate", spec=spec.model_dump(mode="json"),
                            inputs=inputs, fingerprint=fp, summary=summary,
                            files={f: sha256_file(tmp / f) for f in files})
        write_manifest(tmp, manifest)
    return manifest


def evaluate(spec: Spec, source: Source, env: distributed.Env,
             per_document: list[dict] | None = None) -> dict:
    """Run the chosen suites; the report as a dict (see engine/evaluate/report.py). Each
    document's numbers (ppl, wikitext, lambada) are appended to `per_document` when given."""
    cfg = source.cfg
    dtype = _compute_dtype(spec.dtype, env.device)
    model = source.model.to(device=env.device, dtype=dtype).eval()
    scorer = Scorer(model, env.device, spec.batch_tokens,
                    equal_length_batches=isinstance(cfg.rope_scaling, DynamicScaling),
                    progress=spec.progress, rank=env.rank, world_size=env.world_size)
    tokenizer = functools.cache(source.tokenizer)
    bos_id = tokenizer().bos_id if spec.add_bos else None
    if spec.add_bos and bos_id is None:
        log.warning("the tokenizer has no BOS token: none is added")
    trained = cfg.max_position_embeddings
    max_length = spec.max_length or trained
    windows = [parse_window(w) for w in spec.windows or [str(trained)]]
    longest = max([max_length] + [length for length, _ in windows] + (spec.passkey or []))
    if longest > trained and isinstance(cfg.rope_scaling, NoScaling):
        log.warning("evaluating over %d positions with a model trained on %d and no RoPE scaling",
                    longest, trained)

    records: list[dict] = []
    timing: dict[str, float] = {}
    if spec.ppl:
        start = time.perf_counter()
        datasets = [ppl.load_documents(p, tokenizer, spec.text_key, bos_id, cfg.vocab_size,
                                       spec.limit) for p in spec.ppl]
        records += ppl.evaluate(scorer, datasets, windows, per_document)
        timing["ppl"] = time.perf_counter() - start
    if spec.wikitext:
        start = time.perf_counter()
        records += wikitext.evaluate(scorer, spec.wikitext, tokenizer(), bos_id, windows,
                                     spec.wikitext_detokenize, spec.wikitext_convention,
                                     spec.limit, per_document)
        timing["wikitext"] = time.perf_counter() - start
    if spec.lambada:
        start = time.perf_counter()
        records += lambada.evaluate(scorer, spec.lambada, tokenizer(), bos_id, max_length,
                                    spec.text_key, spec.limit, spec.lambada_convention,
                                    per_document)
        timing["lambada"] = time.perf_counter() - start
    if spec.fineval:
        start = time.perf_counter()
        data = fineval_data.load(spec.fineval, spec.fineval_split, spec.fineval_subjects,
                                 spec.fineval_mapping, max(spec.fineval_shots), spec.limit)
        template = fineval.Template(spec.fineval_header, spec.fineval_question, spec.fineval_shot,
                                    spec.fineval_zero_shot_header)
        records += fineval.evaluate(scorer, data, template, tokenizer(), bos_id, max_length,
                                    spec.fineval_shots, spec.fineval_methods).records
        timing["fineval"] = time.perf_counter() - start

    if spec.passkey:
        start = time.perf_counter()
        records += passkey.evaluate(scorer, tokenizer(), bos_id, spec.passkey,
                                    spec.passkey_depths, spec.passkey_trials, spec.passkey_seed)
        timing["passkey"] = time.perf_counter() - start

    path = source.path
    name = f"{path.parent.name}/{path.name}" if path.name.startswith("iter_") else path.name
    return {"model": {"name": name, "path": str(path), "format": source.format,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "config": cfg.model_dump(mode="json")},
            "settings": {"dtype": str(dtype).removeprefix("torch."), "max_length": max_length,
                         "add_bos": bos_id is not None, "device": env.device.type,
                         "world_size": env.world_size},
            "metrics": headline_metrics(records), "records": records, "timing_s": timing}
