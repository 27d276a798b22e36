"""convert: an HF model folder or native checkpoint into the other format (or HF to HF).
The result is checked against its source by logits before it is renamed into place; over
tolerance, nothing is left at the output path."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from engine.atomic import staged_dir
from engine.convert.carry import copy_files, token_ids, tokenizer_files
from engine.convert.hf import CONFIG, DTYPES, load_hf, parse_size, write_hf
from engine.convert.native import TOKENIZER_DIR, load_native, write_native
from engine.convert.verify import TOLERANCE, VerificationError, verify
from engine.errors import InputError
from engine.lineage import stage_fingerprint
from engine.manifest import Manifest, sha256_file, write_manifest
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel
from engine.spec import StageSpec
from engine.train.checkpoint import LATEST

log = logging.getLogger(__name__)
KIND = "hf-model"  # "checkpoint" when the target is native
OUTPUT = "save_dir"  # the spec field naming the artifact this stage writes
SETTINGS = ("model", "token_ids", "parameters")  # summary keys that describe, not measure
Format = Literal["hf", "native"]


class Spec(StageSpec):
    load_dir: str = Field(description="source: HF model folder, or native checkpoint folder "
                                      "(its latest iteration) or iter_* folder",
                          json_schema_extra={"input": True})
    save_dir: str = Field(description="output folder (must not exist or be empty)",
                          json_schema_extra={"affects_output": False})
    source_format: Format = Field(description="hf or native")
    target_format: Format = Field(description="hf or native")
    dtype: Literal["bf16", "fp16", "fp32"] | None = Field(
        None, description="HF output dtype; default: as the source stores its weights (fp32 for "
                          "native sources). Native checkpoints always hold fp32 weights")
    max_shard_size: str = Field("5GB", description="HF output: largest safetensors shard "
                                                   "(5GB = 5e9 bytes, 5GiB = 2^30 bytes)")
    tokenizer: str | None = Field(None, description="tokenizer folder or file to ship with the "
                                                    "model; default: the source's",
                                  json_schema_extra={"input": True})
    tolerance: float = Field(TOLERANCE, gt=0, description="largest |logit difference| allowed "
                                                          "between source and result (fp32)")

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)
        return value

    @model_validator(mode="after")
    def _dtype_for_hf(self) -> Spec:
        if self.dtype is not None and self.target_format == "native":
            raise ValueError("dtype applies to HF output only: native checkpoints hold fp32 "
                             "master weights")
        return self


def _check_source(path: Path, fmt: str) -> None:
    """Says what the folder is when it is not what --source-format claims."""
    is_hf = (path / CONFIG).is_file()
    is_native = (path / LATEST).is_file() or (path / "meta.json").is_file()
    if (fmt == "hf" and is_hf) or (fmt == "native" and is_native):
        return
    if is_hf or is_native:
        found = "an HF model folder" if is_hf else "a native checkpoint"
        raise InputError(f"{path}: is {found}, not --source-format {fmt}; use --source-format "
                         f"{'hf' if is_hf else 'native'}")
    raise InputError(f"{path}: not a model checkpoint: neither an HF model folder ({CONFIG}) nor "
                     f"a native checkpoint ({LATEST}, or meta.json in an iter_* folder)")


def input_paths(spec: Spec) -> dict[str, str]:
    """The source model and, when given, the tokenizer shipped with the result (engine.lineage)."""
    paths = {"source": spec.load_dir}
    if spec.tokenizer:
        paths["tokenizer"] = spec.tokenizer
    return paths


def _load_source(spec: Spec) -> tuple[ModelConfig, LlamaModel, str, list[Path], dict[str, Any]]:
    """(config, model in fp32, dtype the weights are stored in, tokenizer files, token ids)."""
    src = Path(spec.load_dir)
    if spec.source_format == "hf":
        cfg, hf_config, model, stored = load_hf(src)
        tokenizer_src: Path | None = src
        ids = token_ids(hf_config, src)
    else:
        cfg, model, meta, root = load_native(src)
        stored, tokenizer_src = "fp32", root / TOKENIZER_DIR
        if not tokenizer_src.is_dir():  # a training checkpoint has none
            tokenizer_src = None
        ids = token_ids(meta.get("hf_token_ids") or {}, tokenizer_src)
    if spec.tokenizer is not None:
        tokenizer_src = Path(spec.tokenizer)
        ids = {**token_ids({}, tokenizer_src if tokenizer_src.is_dir() else None), **ids}
    tokenizer = tokenizer_files(tokenizer_src)
    if not tokenizer:
        log.warning("%s has no tokenizer files: the output will have none (see --tokenizer)",
                    tokenizer_src or src)
    return cfg, model, stored, tokenizer, ids


def run(spec: Spec) -> Manifest:
    src, dst = Path(spec.load_dir), Path(spec.save_dir)
    _check_source(src, spec.source_format)
    with staged_dir(dst) as tmp:  # first: an occupied output fails before the source is read
        cfg, model, stored, tokenizer, ids = _load_source(spec)
        dtype = (spec.dtype or stored) if spec.target_format == "hf" else "fp32"
        fp, inputs = stage_fingerprint("convert", spec, input_paths(spec))
        summary = {"source_format": spec.source_format, "target_format": spec.target_format,
                   "dtype": dtype, "parameters": sum(p.numel() for p in model.parameters()),
                   "model": cfg.model_dump(mode="json"), "token_ids": ids}
        if spec.target_format == "hf":
            summary["weight_files"] = write_hf(tmp, model, dtype, parse_size(spec.max_shard_size),
                                               ids)
            summary["tokenizer_files"] = copy_files(tokenizer, tmp)
        else:
            write_native(tmp, model, cfg, {"stage": "convert", "source": str(src),
                                           "source_format": spec.source_format,
                                           "hf_token_ids": ids})
            summary["tokenizer_files"] = copy_files(tokenizer, tmp / TOKENIZER_DIR)
        cast = DTYPES[dtype] if dtype != "fp32" else None
        try:
            summary["verification"] = verify(spec.source_format, src, model, spec.target_format,
                                             tmp, cast, spec.tolerance)
        except VerificationError as exc:
            raise VerificationError(f"{src} -> {dst}: {exc}; nothing was written") from None
        files = {str(p.relative_to(tmp)): sha256_file(p)
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = Manifest(kind=KIND if spec.target_format == "hf" else "checkpoint",
                            stage="convert", spec=spec.model_dump(mode="json"), inputs=inputs,
                            fingerprint=fp,
                            summary=summary, files=files)
        write_manifest(tmp, manifest)
    log.info("converted %s (%s) -> %s (%s, %s): max |logit diff| %.3g",
             src, spec.source_format, dst, spec.target_format, dtype,
             summary["verification"]["max_abs_diff"])
    return manifest
