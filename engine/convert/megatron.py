"""Megatron-LM's per-rank checkpoints (`--ckpt-format torch`) as conversion source and target.

    <root>/latest_checkpointed_iteration.txt     an iteration number, or "release"
    <root>/iter_0000100/mp_rank_TT/model_optim_rng.pt          (or release/...)
    <root>/iter_0000100/mp_rank_TT_PPP/model_optim_rng.pt      when pipeline-parallel

Each file holds `model` (`model0`, `model1`, ... with virtual pipeline stages), `args`,
`checkpoint_version`, `iteration`. Pipeline stages hold contiguous layer ranges, numbered from 0
within each stage; with virtual stages (Megatron-LM's interleaved schedule), chunk c of pipeline
rank s is stage c * PP + s. Written as "release" with only the model (no optimizer or RNG
state): Megatron-LM refuses iteration 0, and loads a release checkpoint with `--finetune` /
`--no-load-optim --no-load-rng`. Tensors are named as megatron-core's GPTModel names them (flat)
or as the legacy GPTModel saves them (nested dicts, engine/convert/megatron_names.py).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from engine.convert import megatron_names as names
from engine.convert.megatron_args import args_from_config, config_from_args
from engine.convert.megatron_layout import check_layout, padded_vocab
from engine.convert.megatron_pickle import args_of, load_pickled
from engine.convert.megatron_tensors import Parts, from_parts, merge, split, to_parts
from engine.errors import InputError
from engine.checkpoint.latest import LATEST
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel

log = logging.getLogger(__name__)
FILE = "model_optim_rng.pt"
RELEASE = "release"
CHECKPOINT_VERSION = 3.0
_RANK = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")


def rank_dir(tp_rank: int, pp_rank: int, pipeline_parallel: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pipeline_parallel > 1 else "")


def iteration_dir(path: Path) -> Path:
    """The folder holding the mp_rank_* folders: `path` itself, or the one its latest file
    names."""
    if any(path.glob("mp_rank_*")) or (path / "metadata.json").is_file():
        return path
    latest = path / LATEST
    if not latest.is_file():
        raise InputError(f"{path}: not a Megatron checkpoint: no {LATEST} and no mp_rank_* "
                         "folders")
    text = latest.read_text().strip()
    if text != RELEASE and not text.isdigit():
        raise InputError(f"{latest}: expected an iteration number or 'release', found "
                         f"{text[:40]!r}")
    folder = path / (RELEASE if text == RELEASE else f"iter_{int(text):07d}")
    if not folder.is_dir():
        raise InputError(f"{latest}: names {folder.name}, which is missing")
    return folder


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Legacy models nest their state dicts ({'language_model': {'embedding': ...}})."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def real_vocab(args: dict[str, Any], given: int | None, tokenizer: Path | None,
               padded: int) -> int:
    """The vocabulary without Megatron's padding: as given, else as the args say (lmforge writes
    it), else the tokenizer's, else the padded size kept (with a warning)."""
    vocab = given or args.get("vocab_size") or tokenizer_vocab(tokenizer)
    if vocab is None:
        log.warning("the real vocabulary size is unknown (no vocab_size given, none in the args, "
                    "no tokenizer.json): keeping Megatron's padded %d rows", padded)
        return padded
    if vocab > padded:
        raise InputError(f"vocab_size {vocab} is larger than the checkpoint's {padded} rows")
    return vocab


def tokenizer_vocab(tokenizer: Path | None) -> int | None:
    """Ids a tokenizer.json assigns (its vocabulary and added tokens): the highest + 1."""
    file = tokenizer / "tokenizer.json" if tokenizer and tokenizer.is_dir() else tokenizer
    if file is None or file.name != "tokenizer.json" or not file.is_file():
        return None
    data = json.loads(file.read_text())
    vocab = data.get("model", {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [token["id"] for token in data.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def _models(data: dict[str, Any], file: Path) -> list[dict[str, Any]]:
    """The model chunks of one rank file: `model`, or `model0`, `model1`, ... (virtual stages)."""
    if "model" in data:
        return [data["model"]]
    chunks = sorted((k for k in data if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
    if not chunks:
        raise InputError(f"{file}: no 'model' in the checkpoint (keys: {sorted(data)[:10]})")
    return [data[k] for k in chunks]


def _parse_chunk(state: dict[str, Any], file: Path) -> dict[tuple[int | None, str], Any]:
    parsed, unknown = {}, []
    for key, tensor in flatten(state).items():
        if not names.is_weight(key):
            continue
        try:
            parsed[names.parse(key)] = tensor
        except KeyError as exc:
            unknown.append(exc.args[0])
    if unknown:
        raise InputError(f"{file}: tensors of no known Megatron name: {', '.join(unknown[:5])}")
    return parsed


def read_rank_files(folder: Path) -> tuple[dict[str, Any], dict[tuple[int, int], list], int,
                                           int, bool]:
    """(args, {(tp rank, pp rank): its parsed model chunks}, TP, PP, whether the tensors have
    the legacy GPT names); every file the args' layout calls for must be there, each with as
    many model chunks as the first."""
    first = sorted(folder.glob(f"mp_rank_*/{FILE}"))
    if not first:
        raise InputError(f"{folder}: no mp_rank_*/{FILE} files")
    data = load_pickled(first[0])
    args = args_of(data, first[0])
    tp = args.get("tensor_model_parallel_size") or 1
    pp = args.get("pipeline_model_parallel_size") or 1
    expected = [(t, s) for s in range(pp) for t in range(tp)]
    layout = (f"TP {tp} x PP {pp}: {rank_dir(0, 0, pp)} ... {rank_dir(tp - 1, pp - 1, pp)}"
              f"/{FILE}")
    chunks = _models(data, first[0])
    legacy = any(key.startswith("language_model") for key in flatten(chunks[0]))
    ranks = {}
    for t, s in expected:
        file = folder / rank_dir(t, s, pp) / FILE
        if not file.is_file():
            raise InputError(f"{file}: missing; the checkpoint's args say {layout}")
        rank_data = data if file == first[0] else load_pickled(file)
        version = rank_data.get("checkpoint_version", 0)
        if version < 2.0:
            raise InputError(f"{file}: checkpoint_version {version}: QKV layouts before version "
                             "2.0 are not supported")
        models = _models(rank_data, file)
        if len(models) != len(chunks):
            raise InputError(f"{file}: {len(models)} model chunks, {first[0]} has {len(chunks)}"
                             " (virtual pipeline stages must be the same on every rank)")
        ranks[t, s] = [_parse_chunk(chunk, file) for chunk in models]
    return args, ranks, tp, pp, legacy


def merge_ranks(ranks: dict[tuple[int, int], list], tp: int, pp: int, tied: bool) -> Parts:
    """Whole tensors with global layer numbers from every rank's shards."""
    chunks = len(ranks[0, 0])
    parts: Parts = {}
    offset = 0
    for c in range(chunks):
        for s in range(pp):
            local = ranks[0, s][c]
            layers = sorted({layer for layer, _ in local if layer is not None})
            for layer, part in local:
                if part == "output" and tied:
                    continue  # the last stage's copy of the tied embedding
                shards = [ranks[t, s][c][layer, part] for t in range(tp)]
                key = (None if layer is None else offset + layer, part)
                parts[key] = merge([x.float() if x.is_floating_point() else x for x in shards],
                                   part)
            offset += len(layers)
    return parts


def stored_dtype(ranks: dict[tuple[int, int], list]) -> str:
    by_dtype: Counter = Counter()
    for chunks in ranks.values():
        for chunk in chunks:
            for tensor in chunk.values():
                by_dtype[tensor.dtype] += tensor.numel()
    dtype = by_dtype.most_common(1)[0][0]
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def build_model(cfg: ModelConfig, parts: Parts, epfl: bool, where: str) -> LlamaModel:
    """Our model from whole Megatron tensors; a missing or misshapen one is an InputError."""
    try:
        state = from_parts(parts, cfg, epfl)
    except KeyError as exc:
        layer, part = exc.args[0]
        at = "" if layer is None else f" of layer {layer}"
        raise InputError(f"{where}: no {part} tensor{at} for the model its args describe") \
            from None
    with torch.device("meta"):
        model = LlamaModel(cfg)
    expected = model.state_dict()
    wrong = [f"{n} {tuple(t.shape)} (expected {tuple(expected[n].shape)})"
             for n, t in state.items() if n in expected and t.shape != expected[n].shape]
    if wrong:
        raise InputError(f"{where}: tensors that do not fit the args' model: {'; '.join(wrong)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().eval()


def load_megatron(path: Path, epfl: bool = False, vocab_size: int | None = None,
                  tokenizer: Path | None = None) -> tuple[ModelConfig, LlamaModel, str]:
    """(config, model in fp32, dtype the weights are stored in) of a per-rank checkpoint."""
    folder = iteration_dir(path)
    args, ranks, tp, pp, legacy = read_rank_files(folder)
    where = str(folder)
    embed = next((chunk[None, "embed"] for chunk in ranks[0, 0] if (None, "embed") in chunk),
                 None)
    if embed is None:
        raise InputError(f"{folder / rank_dir(0, 0, pp) / FILE}: no word embeddings")
    vocab = real_vocab(args, vocab_size, tokenizer, embed.shape[0] * tp)
    cfg = config_from_args(args, vocab, where, epfl, legacy)
    parts = merge_ranks(ranks, tp, pp, cfg.tie_word_embeddings)
    return cfg, build_model(cfg, parts, epfl, where), stored_dtype(ranks)


def write_megatron(root: Path, model: LlamaModel, tensor_parallel: int, pipeline_parallel: int,
                   divisible_by: int, dtype: str, names_as: str,
                   virtual_pipeline: int = 1) -> list[str]:
    """root/latest_checkpointed_iteration.txt ("release") + release/mp_rank_*/model_optim_rng.pt;
    `names_as` "local" / "te" (megatron-core, its norms as the local spec's or TE's) or "legacy"
    (the legacy GPT model); `virtual_pipeline` model chunks per pipeline rank. Returns the files
    written."""
    cfg, tp, pp, vp = model.cfg, tensor_parallel, pipeline_parallel, virtual_pipeline
    check_layout(cfg, tp, pp, vp, legacy=names_as == "legacy")
    padded = padded_vocab(cfg.vocab_size, divisible_by, tp)
    args = args_from_config(cfg, tp, pp, divisible_by, padded, dtype, names_as, "torch", vp)
    cast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    state = {n: t.detach().to(cast) for n, t in model.state_dict().items()}
    parts = to_parts(state, cfg, padded)
    stages = pp * vp
    per_stage = cfg.num_layers // stages
    written = []
    for s in range(pp):
        chunks = [_stage_parts(parts, c * pp + s, per_stage, stages, cfg.tie_word_embeddings)
                  for c in range(vp)]
        for t in range(tp):
            local = [_named({key: split(tensor, key[1], tp)[t] for key, tensor in chunk.items()},
                            names_as, cfg.tie_word_embeddings) for chunk in chunks]
            models = {"model": local[0]} if vp == 1 else {f"model{c}": m
                                                          for c, m in enumerate(local)}
            file = root / RELEASE / rank_dir(t, s, pp) / FILE
            file.parent.mkdir(parents=True)
            torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
                        **models}, file)
            written.append(str(file.relative_to(root)))
    (root / LATEST).write_text(RELEASE)
    return written


def _stage_parts(parts: Parts, stage: int, per_stage: int, stages: int, tied: bool) -> Parts:
    """The tensors of one pipeline stage, layers renumbered from 0. The last stage of a tied
    model holds the head as a copy of the embedding when it lacks the embedding itself."""
    first, last = stage == 0, stage == stages - 1
    out: Parts = {}
    for (layer, part), tensor in parts.items():
        if layer is None:
            if (part == "embed" and first) or (part in ("output", "final_norm") and last):
                out[None, part] = tensor
        elif stage * per_stage <= layer < (stage + 1) * per_stage:
            out[layer - stage * per_stage, part] = tensor
    if tied and last and stages > 1:
        out[None, "output"] = parts[None, "embed"]
    return out


def _named(local: Parts, names_as: str, tied: bool) -> dict[str, Any]:
    """One rank's model chunk as Megatron saves it: megatron-core's flat state dict, or the
    legacy model's nested one."""
    if names_as == "legacy":
        nested: dict[str, Any] = {}
        for (layer, part), tensor in local.items():
            *dicts, key = names.legacy_path(layer, part, tied)
            node = nested
            for name in dicts:
                node = node.setdefault(name, {})
            node[key] = tensor
        return nested
    flat = {names.top_name(part) if layer is None else names.layer_name(layer, part, names_as):
            tensor for (layer, part), tensor in local.items()}
    flat.update({name: None for name in _extra_states(flat)})
    return flat


def _extra_states(local: dict[str, torch.Tensor]) -> list[str]:
    """megatron-core's linears save an `_extra_state` (None for the local spec); the last
    stage's head has one even when tied (its weight is then the embedding's)."""
    linear = (".linear_qkv.weight", ".linear_proj.weight", ".linear_fc1.weight",
              ".linear_fc2.weight")
    extra = [n.removesuffix("weight") + "_extra_state" for n in local if n.endswith(linear)]
    last = names.top_name("final_norm") in local
    return extra + (["output_layer._extra_state"] if last else [])
