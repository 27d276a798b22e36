"""The evaluate stage's spec: torch-free, so that listing stages, the CLI's help and the flows'
checks never import torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import CliVariadicArg

from engine.errors import SpecError
from engine.evaluate.templates import (DEFAULT_HEADER, DEFAULT_QUESTION, DEFAULT_SHOT,
                                       check_template)
from engine.formats import tokenizer_path
from engine.spec import StageSpec

_NOT_OUTPUT = {"affects_output": False}
_INPUT = {"input": True}


def parse_window(text: str) -> tuple[int, int]:
    """"LENGTH:STRIDE" or "LENGTH" (stride = length: back to back) -> (length, stride)."""
    length_text, _, stride_text = str(text).partition(":")
    try:
        length = int(length_text)
        stride = int(stride_text) if stride_text else length
    except ValueError:
        raise SpecError(f"window {text!r}: expected LENGTH or LENGTH:STRIDE, e.g. 2048:1024"
                        ) from None
    if length < 1:
        raise SpecError(f"window {text!r}: length must be at least 1")
    if not 1 <= stride <= length:
        raise SpecError(f"window {text!r}: stride {stride} must be between 1 and the length "
                        f"{length} (a window carries at least one token of context over)")
    return length, stride


class Spec(StageSpec):
    """Evaluate a model (HF folder or native checkpoint): perplexity, FinEval, LAMBADA and
    WikiText scores, written as report.json and report.md."""

    load_dir: str = Field(description="model: HF folder (config.json) or native checkpoint "
                          "(root: its latest iteration, or an iter_* folder)",
                          json_schema_extra=_INPUT)
    output: str = Field(description="report folder (must not exist or be empty)",
                        json_schema_extra=_NOT_OUTPUT)
    tokenizer: str | None = Field(None, description="tokenizer file or folder; default: the "
                                  "model folder's (HF) or <checkpoint>/tokenizer/ (native)",
                                  json_schema_extra=_INPUT)
    ppl: CliVariadicArg[list[str] | None] = Field(
        None, description="perplexity datasets: .jsonl files (one document per line), text "
        "files, folders of .txt files, or indexed dataset prefixes (one document per sequence)",
        json_schema_extra=_INPUT)
    windows: CliVariadicArg[list[str] | None] = Field(
        None, description="sliding windows LENGTH[:STRIDE] for ppl and wikitext: LENGTH "
        "positions of the model, windows STRIDE tokens apart (default LENGTH: back to back); "
        "default: the model's max_position_embeddings")
    text_key: str = Field("text", description="JSONL field holding the text (ppl, lambada)")
    fineval: str | None = Field(None, description="FinEval folder with dev/ and the evaluated "
                                "split (e.g. .../fineval/academic)", json_schema_extra=_INPUT)
    fineval_split: str = Field("val", description="folder of the questions to answer")
    fineval_subjects: CliVariadicArg[list[str] | None] = Field(
        None, description="subset of subjects; default all")
    fineval_mapping: str | None = Field(None, description="subject_mapping.json; default: "
                                        "FinEval's own, shipped with lmforge",
                                        json_schema_extra=_INPUT)
    fineval_shots: CliVariadicArg[list[int]] = Field(
        [0, 5], description="shot counts to run (dev questions of the same subject, in file order)")
    fineval_methods: CliVariadicArg[list[Literal["answer", "option"]]] = Field(
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
    lambada_convention: Literal["lm-eval", "megatron", "whole-word"] = Field(
        "lm-eval", description="how the last word is split off and tokenized: lm-eval's "
        "lambada_openai, Megatron-LM's --strict-lambada, or whole-word (ours: the word's own "
        "tokens in running text)")
    wikitext: str | None = Field(None, description="WikiText release text, e.g. wiki.test.raw "
                                 "(word- and byte-level ppl)", json_schema_extra=_INPUT)
    wikitext_convention: Literal["lm-eval", "megatron"] = Field(
        "lm-eval", description="lm-eval: articles, each from BOS, last window with full "
        "context, words and bytes of the articles; megatron: one stream, Megatron-LM's "
        "adjusted perplexity")
    wikitext_detokenize: bool = Field(True, description="apply Megatron's WikiText detokenizer")
    passkey: CliVariadicArg[list[int] | None] = Field(
        None, description="passkey retrieval at these prompt lengths in tokens (e.g. 512 1024 "
        "2048): a 5-digit number hidden in filler text, then asked for")
    passkey_depths: CliVariadicArg[list[float]] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0], description="where the number sits: the share of the "
        "filler before it")
    passkey_trials: int = Field(4, gt=0, description="numbers drawn per length and depth")
    passkey_seed: int = Field(1234, description="the numbers' draw")
    add_bos: bool = Field(True, description="start every document / prompt with BOS")
    max_length: int | None = Field(None, gt=1, description="positions for FinEval and LAMBADA "
                                   "prompts; default: the model's max_position_embeddings")
    limit: int | None = Field(None, gt=0, description="at most this many documents / examples "
                              "per dataset (WikiText: articles, lm-eval convention) and questions "
                              "per subject (quick checks)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="compute dtype; auto: bf16 on GPU, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=_NOT_OUTPUT)
    batch_tokens: int = Field(16384, gt=0, description="tokens per forward batch (padded)",
                              json_schema_extra=_NOT_OUTPUT)
    progress: bool = Field(True, json_schema_extra=_NOT_OUTPUT)
    per_document: bool = Field(False, description="also write documents.jsonl: each document's "
                               "(LAMBADA: example's) summed log-probability and scored tokens, "
                               "for ppl, wikitext and lambada")

    @field_validator("windows")
    @classmethod
    def _windows(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return [f"{length}:{stride}" for length, stride in map(parse_window, value)]

    @field_validator("fineval_shots")
    @classmethod
    def _shots(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 0 or len(set(value)) < len(value):
            raise ValueError("shot counts must be distinct and non-negative, e.g. [0, 5]")
        return value

    @model_validator(mode="after")
    def _suites_and_templates(self) -> Spec:
        if not (self.ppl or self.fineval or self.lambada or self.wikitext or self.passkey):
            raise ValueError("no suite chosen: give at least one of ppl, fineval, lambada, "
                             "wikitext (their data paths) or passkey (its lengths)")
        if self.passkey and (min(self.passkey) < 1 or not all(0 <= d <= 1
                                                              for d in self.passkey_depths)):
            raise ValueError("passkey lengths are positive token counts and passkey_depths "
                             "shares between 0 and 1")
        for part in ("header", "question", "shot"):
            check_template(part, getattr(self, f"fineval_{part}"))
        return self


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
