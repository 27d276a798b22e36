"""train-tokenizer: a SentencePiece BPE tokenizer trained on JSONL text, Llama-style (byte
fallback, split digits, BOS=1, EOS=2), for corpora that have no tokenizer yet."""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Iterator

from pydantic import Field
from pydantic_settings import CliVariadicArg

from engine.atomic import staged_dir
from engine.data.tokenize import documents, resolve_inputs
from engine.errors import InputError, SpecError
from engine.lineage import stage_fingerprint
from engine.manifest import Manifest, sha256_file, write_manifest
from engine.spec import StageSpec



# Llama's: BPE with byte fallback and split digits, BOS=1, EOS=2, text kept as it is
_OPTIONS = dict(model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1,
                eos_id=2, pad_id=-1, character_coverage=1.0, shuffle_input_sentence=False,
                max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True)


class Spec(StageSpec):
    """Train a SentencePiece BPE tokenizer on JSONL text, Llama-style (byte fallback, split
    digits, BOS=1, EOS=2), for corpora that have no tokenizer yet."""

    input: CliVariadicArg[list[str]] = Field(min_length=1, description="JSONL files, folders or "
                                             "globs", json_schema_extra={"input": True})
    output: str = Field(description="output folder (tokenizer.model + manifest)",
                        json_schema_extra={"affects_output": False})
    json_key: str = Field(default="text", description="JSON field holding the text")
    vocab_size: int = Field(default=512, ge=260, description="vocabulary size (>= 256 bytes + 4)")
    max_sentences: int = Field(default=200_000, ge=1,
                               description="train on the first N documents (deterministic)")


def input_paths(spec: Spec) -> dict[str, Path]:
    return {f"input[{i}]": p for i, p in enumerate(resolve_inputs(spec.input))}


def run(spec: Spec) -> Manifest:
    files = resolve_inputs(spec.input)
    model = _train(files, spec)
    with staged_dir(spec.output) as tmp:
        (tmp / "tokenizer.model").write_bytes(model)
        fp, inputs = stage_fingerprint("train-tokenizer", spec, input_paths(spec))
        manifest = Manifest(kind="tokenizer", stage="train-tokenizer",
                            spec=spec.model_dump(mode="json"),
                            inputs=inputs, fingerprint=fp,
                            summary={"vocab_size": spec.vocab_size},
                            files={"tokenizer.model": sha256_file(tmp / "tokenizer.model")})
        write_manifest(tmp, manifest)
    return manifest


def _train(files: list[Path], spec: Spec) -> bytes:
    """The trained model. SentencePiece pulls the texts from C++, which turns an exception raised
    while reading them into a RuntimeError: the InputError is kept aside and raised as itself."""
    import sentencepiece as spm

    errors: list[InputError] = []
    used = 0

    def texts() -> Iterator[str]:
        nonlocal used
        rows = (row[0] for row in documents(files, [spec.json_key]) if row[0])
        try:
            for used, text in enumerate(itertools.islice(rows, spec.max_sentences), 1):
                yield text
        except InputError as exc:
            errors.append(exc)
            raise

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=texts(), model_writer=model,
                                       vocab_size=spec.vocab_size, **_OPTIONS)
    except RuntimeError as exc:
        if errors:
            raise errors[0] from None
        if used == 0:
            raise InputError(f"{', '.join(map(str, files))}: no documents with a non-empty "
                             f"{spec.json_key!r}") from None
        if "Vocabulary size too high" in str(exc):  # the corpus has fewer distinct pieces
            limit = str(exc).rpartition("<=")[2].strip(" .")
            raise SpecError(f"vocab_size: {spec.vocab_size} is more than the corpus "
                            f"({', '.join(map(str, files))}) can fill; at most {limit}") from None
        raise
    return model.getvalue()
