"""Megatron's training arguments <-> our ModelConfig.

Read: megatron-core / Megatron-LM names (`num_query_groups`, `norm_epsilon`, `rotary_base`,
`untie_embeddings_and_output_weights`, ...) and EPFL Megatron-LLM's (`num_attention_heads_kv`,
`layernorm_epsilon`, `rope_theta`, `tie_embed_logits`, ...). A setting that changes the
computation and that our model lacks is an error naming it. Written: the megatron-core names
that Megatron-LM's `--use-checkpoint-args` reads, the padding included, and the flags that pick
the model class (`use_legacy_models`, `transformer_impl`)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from engine.convert.megatron_layout import LEGACY_ROPE_BASE
from engine.errors import InputError
from engine.model.config import Llama3Scaling, LinearScaling, ModelConfig, NoScaling

log = logging.getLogger(__name__)

# Megatron-LM's llama3 RoPE scaling (--use-rope-scaling) has these fixed; only the factor varies.
_MEGATRON_LLAMA3 = dict(low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)
_UNSUPPORTED = ("apply_layernorm_1p", "qk_layernorm", "num_experts", "multi_latent_attention",
                "apply_residual_connection_post_layernorm", "use_post_ln", "parallel_attn",
                "add_bias_linear", "use_bias", "rotary_interleaved")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _get(args: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if args.get(name) is not None:
            return args[name]
    return default


def _rope(args: dict[str, Any], epfl: bool, legacy: bool) -> tuple[float, Any]:
    """(base, scaling). Megatron-LM: linear (position interpolation) or llama3 scaling; its
    legacy model: base 10000 and linear scaling only, whatever else the args say; EPFL: linear
    only, by `rope_scaling_factor`, which Megatron-LM uses for llama3's factor."""
    base = _get(args, "rotary_base", "rope_theta", default=LEGACY_ROPE_BASE)
    if legacy:
        ignored = [f"{name}={args[name]!r}" for name, default in
                   (("rotary_base", LEGACY_ROPE_BASE), ("use_rope_scaling", False))
                   if args.get(name) not in (None, default)]
        if ignored:
            log.warning("legacy GPT checkpoint: Megatron-LM's legacy model ignores %s (RoPE base "
                        "%g, linear scaling only); read as it computed", ", ".join(ignored),
                        LEGACY_ROPE_BASE)
        base = LEGACY_ROPE_BASE
    elif args.get("use_rope_scaling"):
        return base, Llama3Scaling(factor=_get(args, "rope_scaling_factor", default=8.0),
                                   **_MEGATRON_LLAMA3)
    factor = args.get("rope_scaling_factor" if epfl else "rotary_seq_len_interpolation_factor")
    return base, LinearScaling(factor=factor) if factor and factor != 1 else NoScaling()


def check_supported(args: dict[str, Any], where: str, epfl: bool) -> None:
    bad = [f"{name}={args[name]!r}" for name in _UNSUPPORTED
           if args.get(name) and not (epfl and name == "rotary_interleaved")]
    if epfl:
        if not args.get("use_rms_norm"):
            bad.append(f"use_rms_norm={args.get('use_rms_norm')!r}")
        if args.get("glu_activation") != "swiglu":
            bad.append(f"glu_activation={args.get('glu_activation')!r}")
    else:  # Megatron-LM always records both; their defaults are LayerNorm and GeLU
        if args.get("normalization") != "RMSNorm":
            bad.append(f"normalization={args.get('normalization')!r}")
        if args.get("swiglu") is not True:
            bad.append(f"swiglu={args.get('swiglu')!r}")
    if _get(args, "rotary_percent", default=1.0) != 1.0:
        bad.append(f"rotary_percent={args['rotary_percent']}")
    if bad:
        hint = ("; its args are EPFL Megatron-LLM's: use --source-format megatron-epfl"
                if not epfl and "use_rms_norm" in args else "")
        raise InputError(f"{where}: Megatron arguments that lmforge's Llama-family model does "
                         f"not have: {', '.join(bad)} (it needs RMSNorm, SwiGLU, full RoPE, no "
                         f"linear biases but optional q/k/v biases){hint}")


def config_from_args(args: dict[str, Any], vocab_size: int, where: str, epfl: bool = False,
                     legacy: bool = False) -> ModelConfig:
    """`legacy`: the tensors have the legacy GPT model's names (its RoPE differs, see _rope)."""
    check_supported(args, where, epfl)
    rope_theta, rope_scaling = _rope(args, epfl, legacy and not epfl)
    heads = args.get("num_attention_heads")
    if epfl:
        groups = _get(args, "num_attention_heads_kv", default=heads)
    else:
        groups = args.get("num_query_groups") if args.get("group_query_attention") else heads
    tied = (args.get("tie_embed_logits", True) if epfl
            else not args.get("untie_embeddings_and_output_weights", False))
    fields = dict(
        family="qwen2" if args.get("add_qkv_bias") else "llama",
        vocab_size=vocab_size,
        hidden_size=args.get("hidden_size"),
        intermediate_size=args.get("ffn_hidden_size"),
        num_layers=_get(args, "num_layers", "encoder_num_layers"),
        num_heads=heads,
        num_kv_heads=groups,
        head_dim=args.get("kv_channels"),
        max_position_embeddings=_get(args, "max_position_embeddings", "seq_length"),
        rms_norm_eps=_get(args, "norm_epsilon", "layernorm_epsilon", default=1e-5),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(tied),
        init_std=_get(args, "init_method_std", default=0.02),
    )
    missing = [name for name, value in fields.items() if value is None and name != "head_dim"]
    if missing:
        raise InputError(f"{where}: Megatron arguments lack {', '.join(missing)}")
    try:
        return ModelConfig.model_validate(fields)
    except ValueError as exc:
        raise InputError(f"{where}: Megatron arguments give no valid model: {exc}") from None


def args_from_config(cfg: ModelConfig, tensor_parallel: int, pipeline_parallel: int,
                     divisible_by: int, padded_vocab: int, dtype: str, names: str,
                     ckpt_format: str, virtual_pipeline: int = 1) -> argparse.Namespace:
    """The arguments a Megatron-LM run needs to build this model (`--use-checkpoint-args`);
    `names` "local" / "te" (megatron-core's GPTModel) or "legacy" (the legacy GPTModel)."""
    scaling = cfg.rope_scaling
    if isinstance(scaling, Llama3Scaling):
        fixed = {key: getattr(scaling, key) for key in _MEGATRON_LLAMA3}
        if fixed != _MEGATRON_LLAMA3:
            raise InputError(f"Megatron-LM's llama3 RoPE scaling fixes {_MEGATRON_LLAMA3}; this "
                             f"model has {fixed}")
    elif not isinstance(scaling, (NoScaling, LinearScaling)):
        raise InputError(f"Megatron-LM has no RoPE scaling of type {scaling.type!r}")
    interleaved = virtual_pipeline > 1
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size, num_attention_heads=cfg.num_heads,
        group_query_attention=cfg.num_kv_heads != cfg.num_heads,
        num_query_groups=cfg.num_kv_heads, kv_channels=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        seq_length=cfg.max_position_embeddings,
        position_embedding_type="rope", use_rotary_position_embeddings=True,
        add_position_embedding=False,
        rotary_base=cfg.rope_theta, rotary_percent=1.0, rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=(scaling.factor if isinstance(scaling, LinearScaling)
                                             else None),
        use_rope_scaling=isinstance(scaling, Llama3Scaling),
        rope_scaling_factor=(scaling.factor if isinstance(scaling, Llama3Scaling) else 8.0),
        normalization="RMSNorm", norm_epsilon=cfg.rms_norm_eps, swiglu=True,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        add_bias_linear=False, add_qkv_bias=cfg.qkv_bias, init_method_std=cfg.init_std,
        # the real vocabulary and its padding: the importer cuts the padding off again
        vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline if interleaved else None,
        num_layers_per_virtual_pipeline_stage=(
            cfg.num_layers // (pipeline_parallel * virtual_pipeline) if interleaved else None),
        params_dtype=_DTYPES[dtype], bf16=dtype == "bf16", fp16=dtype == "fp16",
        transformer_impl="transformer_engine" if names == "te" else "local",
        use_legacy_models=names == "legacy", ckpt_format=ckpt_format, iteration=0,
        consumed_train_samples=0, consumed_valid_samples=0)
