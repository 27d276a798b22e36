"""Calibration sequences: the leading tokens of a tokenized dataset, or of JSONL text tokenized
with the checkpoint's tokenizer, packed into [samples, seq_length + 1] (inputs and their next
tokens), documents one after another as pretraining packs them. Data tokenized with another
tokenizer than the checkpoint's is refused where both are recorded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from engine.data.indexed import IndexedDataset, index_path
from engine.data.provenance import check_same_tokenizer, checkpoint_tokenizers
from engine.data.tokenize import resolve_inputs
from engine.data.tokenizer import load_tokenizer
from engine.errors import InputError
from engine.evaluate.inputs import read_jsonl
from engine.formats import tokenizer_path

log = logging.getLogger(__name__)


def calibration_tokens(data: str, checkpoint: Path, vocab_size: int, samples: int,
                       seq_length: int, text_key: str = "text",
                       tokenizer: str | None = None) -> torch.Tensor:
    """[samples, seq_length + 1] token ids of `data` (fewer samples, with a warning, if it is
    short) for the model `checkpoint` (an iter_* folder or an HF folder); JSONL is tokenized
    with `tokenizer`, else the model's own."""
    if index_path(data).is_file():
        check_same_tokenizer(checkpoint, [data], f"calibration {data}", "model",
                             "calibration data")
        stream = _dataset_documents(data)
    else:
        stream = _jsonl_documents(data, text_key, checkpoint, tokenizer)
    tokens = _leading(stream, samples * (seq_length + 1))
    found = len(tokens) // (seq_length + 1)
    if found == 0:
        raise InputError(f"calibration {data}: {len(tokens)} tokens, fewer than one sequence of "
                         f"{seq_length + 1}")
    if found < samples:
        log.warning("calibration %s holds %d sequences of %d tokens, not the %d asked for",
                    data, found, seq_length + 1, samples)
    out = torch.from_numpy(tokens[:found * (seq_length + 1)].astype(np.int64))
    if int(out.max()) >= vocab_size:
        raise InputError(f"calibration {data}: token id {int(out.max())} is outside "
                         f"the model's vocabulary of {vocab_size}: tokenized with another "
                         f"tokenizer")
    return out.view(found, seq_length + 1)


def _leading(documents: Iterator[np.ndarray], count: int) -> np.ndarray:
    parts, have = [], 0
    for doc in documents:
        parts.append(doc[:count - have])
        have += len(parts[-1])
        if have == count:
            break
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _dataset_documents(prefix: str) -> Iterator[np.ndarray]:
    data = IndexedDataset(prefix)
    for i in range(len(data)):
        yield np.asarray(data[i])


def _jsonl_documents(data: str, text_key: str, checkpoint: Path,
                     tokenizer: str | None) -> Iterator[np.ndarray]:
    found = tokenizer_path(str(checkpoint), tokenizer)
    if found is None:
        raise InputError(f"{checkpoint}: no tokenizer with the model for the JSONL calibration "
                         f"data; pass --tokenizer")
    tok = load_tokenizer(found)
    recorded = checkpoint_tokenizers(checkpoint)
    if tokenizer is not None and recorded and tok.sha256 not in recorded:
        raise InputError(f"tokenizer {tokenizer} is not the checkpoint's (sha256 "
                         f"{tok.sha256[:16]} vs {sorted(s[:16] for s in recorded)})")
    for file in resolve_inputs([data]):
        for text in read_jsonl(file, text_key):
            ids = list(tok.encode([text])[0])
            if tok.bos_id is not None:
                ids = [tok.bos_id] + ids
            elif tok.eod_id is not None:
                ids = ids + [tok.eod_id]
            yield np.asarray(ids, dtype=np.int64)
