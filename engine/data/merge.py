"""merge: several Megatron indexed datasets -> one (`<output_prefix>.bin/.idx`), like Megatron-LM's
tools/merge_datasets.py. Every check (each input's structure and, where it has a manifest, its
checksums; one token dtype; one tokenizer) runs before a byte is written; the output carries
temporary names until it is complete."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, Field
from pydantic_settings import CliVariadicArg

from engine.atomic import StagedFiles
from engine.data.indexed import IndexedDataset, data_path, index_path, write_index
from engine.errors import InputError
from engine.lineage import artifact_manifest, stage_inputs
from engine.manifest import (FileEntry, Manifest, dataset_prefix, fingerprint, sha256_file,
                             write_manifest)
from engine.spec import StageSpec

log = logging.getLogger(__name__)


class Spec(StageSpec):
    """Merge several Megatron indexed datasets into one (<output_prefix>.bin/.idx), like
    Megatron-LM's tools/merge_datasets.py; every input is checked before a byte is written."""

    input: CliVariadicArg[list[str]] = Field(min_length=1, description="dataset prefixes, or "
                                             "folders of .bin/.idx pairs",
                                             json_schema_extra={"input": True})
    output_prefix: Annotated[str, AfterValidator(dataset_prefix)] = Field(
        description="writes <prefix>.bin/.idx", json_schema_extra={"affects_output": False})


def resolve_prefixes(inputs: list[str]) -> list[str]:
    prefixes: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p.with_suffix("")) for p in path.glob("*.idx")
                           if p.with_suffix(".bin").is_file())
            if not found:
                raise InputError(f"{path}: folder has no .bin/.idx pairs")
            prefixes.extend(found)
        else:
            prefixes.append(item)
    return prefixes


def input_paths(spec: Spec) -> dict[str, str]:
    return {f"input[{i}]": p for i, p in enumerate(resolve_prefixes(spec.input))}


def _tokenizer_of(manifest: Manifest | None) -> dict | None:
    return manifest.summary.get("tokenizer") if manifest else None


def run(spec: Spec) -> Manifest:
    prefixes = resolve_prefixes(spec.input)
    datasets = [IndexedDataset(p) for p in prefixes]
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        listing = ", ".join(f"{p} ({ds.dtype.name})" for p, ds in zip(prefixes, datasets))
        raise InputError(f"cannot merge datasets of different token dtypes: {listing}")
    manifests = [artifact_manifest(p) for p in prefixes]
    tokenizers = {p: _tokenizer_of(m) for p, m in zip(prefixes, manifests)}
    known = {p: t for p, t in tokenizers.items() if t}
    if len({t["sha256"] for t in known.values()}) > 1:
        listing = ", ".join(f"{p} ({t['file']} {t['sha256'][:12]})" for p, t in known.items())
        raise InputError(f"cannot merge datasets made with different tokenizers: {listing}")
    for p in prefixes:
        if p not in known:
            log.warning("%s has no manifest: its tokenizer cannot be checked", p)
    out = spec.output_prefix

    digest = hashlib.sha256()
    with StagedFiles() as staged:
        bin_tmp, idx_tmp = staged.stage(data_path(out)), staged.stage(index_path(out))
        with open(bin_tmp, "wb") as f:
            for ds in datasets:
                used = ds.num_tokens * ds.dtype.itemsize
                with open(data_path(ds.prefix), "rb") as src:
                    while used > 0 and (block := src.read(min(1 << 24, used))):
                        f.write(block)
                        digest.update(block)
                        used -= len(block)
        lengths = np.concatenate([ds.sequence_lengths for ds in datasets])
        offsets = np.cumsum([0] + [len(ds) for ds in datasets[:-1]])
        docs = np.concatenate([datasets[0].document_indices[:1]] +
                              [ds.document_indices[1:] + off for ds, off in zip(datasets, offsets)])
        with open(idx_tmp, "wb") as f:
            write_index(f, datasets[0].dtype, lengths, docs)
        staged.commit()

    inputs = stage_inputs(input_paths(spec))
    summary = {"documents": int(len(docs) - 1), "sequences": int(len(lengths)),
               "tokens": int(lengths.sum(dtype=np.int64)), "dtype": datasets[0].dtype.name,
               "tokenizer": next(iter(known.values()), None),
               "parts": [{"prefix": p, "documents": ds.num_documents, "tokens": ds.num_tokens}
                         for p, ds in zip(prefixes, datasets)]}
    files = {data_path(out).name: FileEntry(sha256=digest.hexdigest(),
                                            bytes=data_path(out).stat().st_size),
             index_path(out).name: sha256_file(index_path(out))}
    manifest = Manifest(kind="dataset", stage="merge", spec=spec.model_dump(mode="json"),
                        inputs=inputs,
                        fingerprint=fingerprint("merge", spec.fingerprint_fields(), inputs),
                        summary=summary, files=files)
    write_manifest(out, manifest)
    log.info("merged %d datasets: %d documents, %d tokens", len(datasets),
             summary["documents"], summary["tokens"])
    return manifest
