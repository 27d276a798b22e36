"""convert: between HF model folders, native checkpoints and Megatron-LM checkpoints. The result
is checked against its source by logits before it is renamed into place; over tolerance, nothing
is left at the output path."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from engine.atomic import staged_dir
from engine.convert.carry import copy_files, token_ids, tokenizer_files
from engine.convert.hf import DTYPES, load_hf, write_hf
from engine.convert.megatron_formats import load_megatron_source, write_megatron_target
from engine.convert.megatron_layout import padded_vocab
from engine.convert.native import load_native, write_native
from engine.convert.spec import (MEGATRON_SOURCES, MEGATRON_TARGETS, Spec, input_paths,
                                 parse_size)
from engine.convert.verify import VerificationError, verify
from engine.errors import InputError
from engine.formats import CONFIG, LATEST, TOKENIZER_DIR
from engine.lineage import stage_fingerprint
from engine.manifest import Manifest, sha256_file, write_manifest
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel

log = logging.getLogger(__name__)


_FOUND = {"hf": "an HF model folder", "native": "a native checkpoint",
          "megatron": "a Megatron-LM per-rank checkpoint", "mcore-dist": "a torch_dist checkpoint"}


def _folder_format(folder: Path) -> str | None:
    if (folder / "meta.json").is_file():
        return "native"
    if any(folder.glob("mp_rank_*")):
        return "megatron"
    if (folder / "metadata.json").is_file():
        return "mcore-dist"
    return None


def found_format(path: Path) -> str | None:
    """What a folder holds, told by its files: its own or those of the iteration its
    latest-iteration file names."""
    if (path / CONFIG).is_file():
        return "hf"
    found = _folder_format(path)
    latest = path / LATEST
    if found is None and latest.is_file():
        text = latest.read_text().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() \
            else None
        found = (_folder_format(path / name) if name else None) or "native"
    return found


def _check_source(path: Path, fmt: str) -> None:
    """Says what the folder is when it is not what --source-format claims."""
    found = found_format(path)
    if found == fmt or (found == "megatron" and fmt == "megatron-epfl"):
        return
    if found is not None:
        raise InputError(f"{path}: is {_FOUND[found]}, not --source-format {fmt}; use "
                         f"--source-format {found}")
    raise InputError(f"{path}: not a model checkpoint: neither an HF model folder ({CONFIG}) nor "
                     f"a native checkpoint ({LATEST}, or meta.json in an iter_* folder) nor a "
                     f"Megatron one (mp_rank_* folders, or torch_dist's metadata.json)")


def _load_source(spec: Spec) -> tuple[ModelConfig, LlamaModel, str, list[Path], dict[str, Any]]:
    """(config, model in fp32, dtype the weights are stored in, tokenizer files, token ids)."""
    src = Path(spec.load_dir)
    if spec.source_format == "hf":
        cfg, hf_config, model, stored = load_hf(src)
        tokenizer_src: Path | None = src
        ids = token_ids(hf_config, src)
    elif spec.source_format in MEGATRON_SOURCES:
        tokenizer_src = src / TOKENIZER_DIR  # where a Megatron export of ours put it
        if spec.tokenizer is not None or not tokenizer_src.is_dir():
            tokenizer_src = Path(spec.tokenizer) if spec.tokenizer else None
        cfg, model, stored = load_megatron_source(spec.source_format, src, spec.vocab_size,
                                                  tokenizer_src)
        ids = {}
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
        dtype = (spec.dtype or stored) if spec.target_format != "native" else "fp32"
        fp, inputs = stage_fingerprint("convert", spec, input_paths(spec))
        summary = {"source_format": spec.source_format, "target_format": spec.target_format,
                   "dtype": dtype, "parameters": sum(p.numel() for p in model.parameters()),
                   "model": cfg.model_dump(mode="json"), "token_ids": ids}
        if spec.target_format == "hf":
            summary["weight_files"] = write_hf(tmp, model, dtype, parse_size(spec.max_shard_size),
                                               ids)
            summary["tokenizer_files"] = copy_files(tokenizer, tmp)
        elif spec.target_format in MEGATRON_TARGETS:
            summary["weight_files"] = write_megatron_target(spec, tmp, model, dtype)
            summary["megatron"] = {"tensor_parallel": spec.tensor_parallel,
                                   "pipeline_parallel": spec.pipeline_parallel,
                                   "virtual_pipeline_parallel": spec.virtual_pipeline_parallel,
                                   "names": spec.megatron_names,
                                   "padded_vocab_size": padded_vocab(
                                       cfg.vocab_size, spec.make_vocab_size_divisible_by,
                                       spec.tensor_parallel)}
            summary["tokenizer_files"] = copy_files(tokenizer, tmp / TOKENIZER_DIR)
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
        manifest = Manifest(kind="hf-model" if spec.target_format == "hf" else "checkpoint",
                            stage="convert", spec=spec.model_dump(mode="json"), inputs=inputs,
                            fingerprint=fp,
                            summary=summary, files=files)
        write_manifest(tmp, manifest)
    log.info("converted %s (%s) -> %s (%s, %s): max |logit diff| %.3g",
             src, spec.source_format, dst, spec.target_format, dtype,
             summary["verification"]["max_abs_diff"])
    return manifest
