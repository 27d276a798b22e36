"""train-tokenizer: a SentencePiece BPE tokenizer trained on JSONL text, Llama-style (byte
fallback, split digits, BOS=1, EOS=2), for corpora that have no tokenizer yet."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path
from typing import Iterator

from pydantic import Field

from engine.atomic import staged_dir
from engine.data.tokenize import resolve_inputs
from engine.errors import InputError
from engine.lineage import stage_fingerprint
from engine.manifest import Manifest, sha256_file, write_manifest
from engine.spec import StageSpec

KIND = "tokenizer"
OUTPUT = "output"  # the spec field naming the artifact this stage writes


class Spec(StageSpec):
    input: list[str] = Field(min_length=1, description="JSONL files, folders or globs",
                             json_schema_extra={"input": True})
    output: str = Field(description="output folder (tokenizer.model + manifest)",
                        json_schema_extra={"affects_output": False})
    json_key: str = Field(default="text", description="JSON field holding the text")
    vocab_size: int = Field(default=512, ge=260, description="vocabulary size (>= 256 bytes + 4)")
    max_sentences: int = Field(default=200_000, ge=1,
                               description="train on the first N documents (deterministic)")


def _texts(files: list[Path], key: str) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)[key]
                    except (ValueError, KeyError, TypeError):
                        raise InputError(f"{path}:{n}: not a JSON object with a string {key!r}") from None


def input_paths(spec: Spec) -> dict[str, Path]:
    return {f"input[{i}]": p for i, p in enumerate(resolve_inputs(spec.input))}


def run(spec: Spec) -> Manifest:
    import sentencepiece as spm

    files = resolve_inputs(spec.input)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=itertools.islice(_texts(files, spec.json_key), spec.max_sentences),
        model_writer=model,
        vocab_size=spec.vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        shuffle_input_sentence=False, max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True)
    with staged_dir(spec.output) as tmp:
        (tmp / "tokenizer.model").write_bytes(model.getvalue())
        fp, inputs = stage_fingerprint("train-tokenizer", spec, input_paths(spec))
        manifest = Manifest(kind=KIND, stage="train-tokenizer", spec=spec.model_dump(mode="json"),
                            inputs=inputs, fingerprint=fp,
                            summary={"vocab_size": spec.vocab_size},
                            files={"tokenizer.model": sha256_file(tmp / "tokenizer.model")})
        write_manifest(tmp, manifest)
    return manifest
