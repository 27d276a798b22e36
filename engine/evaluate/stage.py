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
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator, model_validator

from engine.atomic import staged_dir
from engine.errors import InputError
from engine.evaluate import fineval, fineval_data, lambada, ppl, wikitext
from engine.evaluate.fineval import DEFAULT_HEADER, DEFAULT_QUESTION, DEFAULT_SHOT
from engine.evaluate.report import headline_metrics, write_report
from engine.evaluate.scoring import Scorer
from engine.evaluate.source import Source, load_source, tokenizer_path
from engine.lineage import stage_fingerprint
from engine.manifest import Manifest, sha256_file, write_manifest
from engine.model.config import DynamicScaling, NoScaling
from engine.parallel import distributed
from engine.spec import StageSpec

log = logging.getLogger(__name__)
KIND = "eval-report"
OUTPUT = "output"  # the spec field naming the artifact this stage writes
_NOT_OUTPUT = {"affects_output": False}
_INPUT = {"input": True}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Spec(StageSpec):
    load_dir: str = Field(description="model: HF folder (config.json) or native checkpoint "
                          "(root: its latest iteration, or an iter_* folder)",
                          json_schema_extra=_INPUT)
    output: str = Field(description="report folder (must not exist or be empty)",
                        json_schema_extra=_NOT_OUTPUT)
    tokenizer: str | None = Field(None, description="tokenizer file or folder; default: the "
                                  "model folder's (HF) or <checkpoint>/tokenizer/ (native)",
                                  json_schema_extra=_INPUT)
    ppl: list[str] | None = Field(None, description="perplexity datasets: .jsonl files (one "
                                  "document per line), text files, folders of .txt files, or "
                                  "indexed dataset prefixes (one document per sequence)",
                                  json_schema_extra=_INPUT)
    windows: list[str] | None = Field(None, description="sliding windows LENGTH[:STRIDE] for ppl "
                                      "and wikitext (stride default LENGTH/2); default: the "
                                      "model's max_position_embeddings")
    text_key: str = Field("text", description="JSONL field holding the text (ppl, lambada)")
    fineval: str | None = Field(None, description="FinEval folder with dev/ and the evaluated "
                                "split (e.g. .../fineval/academic)", json_schema_extra=_INPUT)
    fineval_split: str = Field("val", description="folder of the questions to answer")
    fineval_subjects: list[str] | None = Field(None, description="subset of subjects; default all")
    fineval_mapping: str | None = Field(None, description="subject_mapping.json; default: "
                                        "FinEval's own, shipped with lmforge",
                                        json_schema_extra=_INPUT)
    fineval_shots: list[int] = Field([0, 5], description="shot counts to run (dev questions of "
                                     "the same subject, in file order)")
    fineval_methods: list[Literal["answer", "option"]] = Field(
        ["answer", "option"], description="answer: next-token logits of the letters (FinEval's "
        "protocol); option: log-likelihood of each option's text")
    fineval_header: str = Field(DEFAULT_HEADER, description="prompt header; "
                                "placeholders {subject} {subject_zh} {category}")
    fineval_question: str = Field(DEFAULT_QUESTION, description="question template; "
                                  "placeholders {question} {A} {B} {C} {D}")
    fineval_shot: str = Field(DEFAULT_SHOT, description="appended to a shot's question: "
                              "{answer} and the separator")
    fineval_zero_shot_header: bool = Field(False, description="header on zero-shot prompts too "
                                           "(FinEval's code has none)")
    lambada: str | None = Field(None, description="LAMBADA JSONL (last word of each text)",
                                json_schema_extra=_INPUT)
    wikitext: str | None = Field(None, description="WikiText raw text file (word-level ppl)",
                                 json_schema_extra=_INPUT)
    wikitext_detokenize: bool = Field(True, description="apply Megatron's WikiText detokenizer")
    add_bos: bool = Field(True, description="start every document / prompt with BOS")
    max_length: int | None = Field(None, gt=1, description="context for FinEval and LAMBADA "
                                   "prompts; default: the model's max_position_embeddings")
    limit: int | None = Field(None, gt=0, description="at most this many documents / examples "
                              "per dataset and questions per subject (quick checks)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="compute dtype; auto: bf16 on GPU, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=_NOT_OUTPUT)
    batch_tokens: int = Field(16384, gt=0, description="tokens per forward batch (padded)",
                              json_schema_extra=_NOT_OUTPUT)
    progress: bool = Field(True, json_schema_extra=_NOT_OUTPUT)

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return [f"{length}:{stride}" for length, stride in map(ppl.parse_window, value)]

    @field_validator("fineval_shots")
    @classmethod
    def _shots(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 0 or len(set(value)) < len(value):
            raise ValueError("shot counts must be distinct and non-negative, e.g. [0, 5]")
        return value

    @model_validator(mode="after")
    def _suites_and_templates(self) -> Spec:
        if not (self.ppl or self.fineval or self.lambada or self.wikitext):
            raise ValueError("no suite chosen: give at least one of ppl, fineval, lambada, "
                             "wikitext (their data paths)")
        for part in ("header", "question", "shot"):
            fineval.check_template(part, getattr(self, f"fineval_{part}"))
        return self


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
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: output folder exists and is not empty")
    _check_paths(spec)
    source = load_source(spec.load_dir, spec.tokenizer)  # before any process group: no collectives
    owns_group = not dist.is_initialized()
    env = distributed.setup(spec.device)
    try:
        report = evaluate(spec, source, env)
    finally:
        if owns_group:
            distributed.teardown()
    if not env.is_main:
        return None
    with staged_dir(out) as tmp:
        files = write_report(tmp, report)
        fp, inputs = stage_fingerprint("evaluate", spec, input_paths(spec))
        finite = {k: v for k, v in report["metrics"].items() if math.isfinite(v)}
        summary = {"model": report["model"]["name"], "metrics": finite,
                   "timing_s": report["timing_s"]}
        manifest = Manifest(kind=KIND, stage="evaluate", spec=spec.model_dump(mode="json"),
                            inputs=inputs, fingerprint=fp, summary=summary,
                            files={f: sha256_file(tmp / f) for f in files})
        write_manifest(tmp, manifest)
    return manifest


def input_paths(spec: Spec) -> dict[str, str]:
    """The model, its tokenizer and every data file or folder (engine.lineage)."""
    paths = {"model": spec.load_dir}
    tokenizer = tokenizer_path(spec.load_dir, spec.tokenizer)
    if tokenizer is not None:
        paths["tokenizer"] = str(tokenizer)
    paths.update({f"ppl[{i}]": p for i, p in enumerate(spec.ppl or [])})
    for name in ("fineval", "fineval_mapping", "lambada", "wikitext"):
        if getattr(spec, name):
            paths[name] = getattr(spec, name)
    return paths


def evaluate(spec: Spec, source: Source, env: distributed.Env) -> dict:
    """Run the chosen suites; the report as a dict (see engine/evaluate/report.py)."""
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
    windows = [ppl.parse_window(w) for w in spec.windows or [str(trained)]]
    longest = max([max_length] + [length for length, _ in windows])
    if longest > trained and isinstance(cfg.rope_scaling, NoScaling):
        log.warning("evaluating %d-token contexts with a model trained on %d and no RoPE scaling",
                    longest, trained)

    records: list[dict] = []
    timing: dict[str, float] = {}
    if spec.ppl:
        start = time.perf_counter()
        datasets = [ppl.load_documents(p, tokenizer, spec.text_key, bos_id, cfg.vocab_size,
                                       spec.limit) for p in spec.ppl]
        records += ppl.evaluate(scorer, datasets, windows)
        timing["ppl"] = time.perf_counter() - start
    if spec.wikitext:
        start = time.perf_counter()
        records += wikitext.evaluate(scorer, spec.wikitext, tokenizer(), bos_id, windows,
                                     spec.wikitext_detokenize)
        timing["wikitext"] = time.perf_counter() - start
    if spec.lambada:
        start = time.perf_counter()
        records += lambada.evaluate(scorer, spec.lambada, tokenizer(), bos_id, max_length,
                                    spec.text_key, spec.limit)
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

    path = source.path
    name = f"{path.parent.name}/{path.name}" if path.name.startswith("iter_") else path.name
    return {"model": {"name": name, "path": str(path), "format": source.format,
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "config": cfg.model_dump(mode="json")},
            "settings": {"dtype": str(dtype).removeprefix("torch."), "max_length": max_length,
                         "add_bos": bos_id is not None, "device": env.device.type,
                         "world_size": env.world_size},
            "metrics": headline_metrics(records), "records": records, "timing_s": timing}
