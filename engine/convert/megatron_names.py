"""Megatron's tensor names, mapped to the role each tensor plays ("part") and back.

Parts: `embed`, `output`, `final_norm`, and per layer `attn_norm`, `qkv`, `qkv_bias`, `proj`,
`mlp_norm`, `fc1`, `fc2`. Import reads every naming Megatron has used:
- megatron-core: `embedding.word_embeddings.weight`, `decoder.layers.N.self_attention.linear_qkv`,
  `linear_proj`, `mlp.linear_fc1`, `linear_fc2`, `decoder.final_layernorm`, `output_layer`; the
  norms as the local spec's `input_layernorm` / `pre_mlp_layernorm` or as Transformer Engine's
  fused `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`;
- legacy GPT (`language_model.embedding...`, `language_model.encoder.layers.N.self_attention.
  query_key_value`, `dense`, `mlp.dense_h_to_4h`, `dense_4h_to_h`, the norms as `input_norm`,
  `post_attention_norm`, `final_norm` (since late 2023; `*_layernorm` before, which Megatron-LM
  still renames on load), `language_model.output_layer`), stored as nested dicts that are
  flattened with dots;
- EPFL Megatron-LLM's variants of the legacy names (`transformer` for `encoder`, `attention` for
  `self_attention`, `language_model.lm_head`).
Export writes megatron-core names (the local spec's norms by default, TE's on request) or the
legacy names as today's Megatron-LM legacy model and the Megatron Cookbook's fork save them."""

from __future__ import annotations

import re

TOP_PARTS = ("embed", "output", "final_norm")
LAYER_PARTS = ("attn_norm", "qkv", "qkv_bias", "proj", "mlp_norm", "fc1", "fc2")
LINEARS = ("qkv", "proj", "fc1", "fc2")  # megatron-core linears carry an `_extra_state`

_TOP = {
    "embedding.word_embeddings.weight": "embed",
    "output_layer.weight": "output",
    "decoder.final_layernorm.weight": "final_norm",
    "language_model.embedding.word_embeddings.weight": "embed",
    "language_model.output_layer.weight": "output",
    "language_model.lm_head": "output",
    "language_model.encoder.final_layernorm.weight": "final_norm",
    "language_model.encoder.final_norm.weight": "final_norm",
    "language_model.transformer.final_layernorm.weight": "final_norm",
    "word_embeddings_for_head.weight": "output",  # legacy: a tied head's copy, last stage
}
_LOCAL = {"attn_norm": "input_layernorm.weight", "qkv": "self_attention.linear_qkv.weight",
          "qkv_bias": "self_attention.linear_qkv.bias",
          "proj": "self_attention.linear_proj.weight", "mlp_norm": "pre_mlp_layernorm.weight",
          "fc1": "mlp.linear_fc1.weight", "fc2": "mlp.linear_fc2.weight"}
_TE_NORMS = {"attn_norm": "self_attention.linear_qkv.layer_norm_weight",
             "mlp_norm": "mlp.linear_fc1.layer_norm_weight"}
_LEGACY_WRITTEN = {"attn_norm": "input_norm.weight",
                   "qkv": "self_attention.query_key_value.weight",
                   "qkv_bias": "self_attention.query_key_value.bias",
                   "proj": "self_attention.dense.weight", "mlp_norm": "post_attention_norm.weight",
                   "fc1": "mlp.dense_h_to_4h.weight", "fc2": "mlp.dense_4h_to_h.weight"}
_LEGACY = {**{name: part for part, name in _LEGACY_WRITTEN.items()},
           "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm"}
_IN_LAYER = {**{name: part for part, name in _LOCAL.items()},
             **{name: part for part, name in _TE_NORMS.items()}, **_LEGACY,
             **{name.replace("self_attention.", "attention."): part
                for name, part in _LEGACY.items()}}
_LAYER = re.compile(r"(?:decoder|language_model\.(?:encoder|transformer))\.layers\.(\d+)\.(.+)")
_STACKED = re.compile(r"decoder\.layers\.(.+)")  # torch_dist: every layer in one tensor
_NOT_WEIGHTS = ("_extra_state", "inv_freq")  # TE's FP8 metadata; RoPE frequencies (computed)


def is_weight(name: str) -> bool:
    return not name.rsplit(".", 1)[-1].startswith(_NOT_WEIGHTS) and "/" not in name


def parse(name: str) -> tuple[int | None, str]:
    """(layer number as stored, part) of a tensor name; KeyError for a name of no known part."""
    if name in _TOP:
        return None, _TOP[name]
    match = _LAYER.fullmatch(name)
    if match and match[2] in _IN_LAYER:
        return int(match[1]), _IN_LAYER[match[2]]
    if "position_embeddings" in name:
        raise KeyError(f"{name} (learned absolute positions: lmforge models use RoPE)")
    raise KeyError(name)


def parse_stacked(name: str) -> tuple[bool, str]:
    """(whether the tensor stacks every layer, part) of a torch_dist key."""
    match = _STACKED.fullmatch(name)
    if match and match[1] in _IN_LAYER:
        return True, _IN_LAYER[match[1]]
    return False, parse(name)[1]


def top_name(part: str) -> str:
    return {"embed": "embedding.word_embeddings.weight", "output": "output_layer.weight",
            "final_norm": "decoder.final_layernorm.weight"}[part]


def layer_name(layer: int | None, part: str, norms: str) -> str:
    """`decoder.layers.{layer}.<name>`, or `decoder.layers.<name>` (stacked) for None; `norms`
    "local" or "te"."""
    name = (_TE_NORMS if norms == "te" else {}).get(part) or _LOCAL[part]
    return f"decoder.layers.{name}" if layer is None else f"decoder.layers.{layer}.{name}"


def legacy_path(layer: int | None, part: str, tied: bool) -> tuple[str, ...]:
    """Where the legacy GPTModel's `state_dict_for_save_checkpoint` puts a tensor: a dict per
    module (language_model > embedding > word_embeddings > weight), the encoder's own state dict
    flat inside its dict. The head of a tied model exists only on a last pipeline stage that
    lacks the embedding, as `word_embeddings_for_head`."""
    if layer is not None:
        return ("language_model", "encoder", f"layers.{layer}.{_LEGACY_WRITTEN[part]}")
    if part == "output" and tied:
        return ("word_embeddings_for_head", "weight")
    return {"embed": ("language_model", "embedding", "word_embeddings", "weight"),
            "output": ("language_model", "output_layer", "weight"),
            "final_norm": ("language_model", "encoder", "final_norm.weight")}[part]
