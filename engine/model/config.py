"""The model's shape as one typed, validated record, and its translation to and from the
`config.json` of Hugging Face Llama / Mistral / Qwen2 models.

RoPE scaling keeps HF's parameter names so that a config round-trips through HF unchanged. On
export it is written both ways: transformers 4.x's (`rope_theta` + `rope_scaling`) and 5.x's
(`rope_parameters`, theta inside); each reads its own and ignores the other, as vLLM does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.errors import InputError


class _Record(BaseModel):
    """Unknown fields are errors, floats are finite (JSON's Infinity / NaN included); a built
    model's config never changes under it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NoScaling(_Record):
    """Plain RoPE."""

    type: Literal["none"] = "none"


class LinearScaling(_Record):
    """Position interpolation: every frequency divided by `factor`."""

    type: Literal["linear"] = "linear"
    factor: float = Field(ge=1)


class DynamicScaling(_Record):
    """Dynamic NTK: the base grows with the current sequence length beyond
    `max_position_embeddings`; plain RoPE below it."""

    type: Literal["dynamic"] = "dynamic"
    factor: float = Field(ge=1)


class YarnScaling(_Record):
    """YaRN (arXiv 2309.00071): per-frequency blend of interpolation and extrapolation, plus an
    attention temperature (`attention_factor`, else derived from factor / mscale / mscale_all_dim).

    `factor` is used as given, as transformers 5.x and vLLM do; transformers 4.x instead uses
    max_position_embeddings / original_max_position_embeddings, so keep the two consistent for
    models that must load in both."""

    type: Literal["yarn"] = "yarn"
    factor: float = Field(ge=1)
    original_max_position_embeddings: int = Field(gt=0)
    beta_fast: float = Field(default=32.0, gt=0)
    beta_slow: float = Field(default=1.0, gt=0)
    attention_factor: float | None = Field(default=None, gt=0)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


class Llama3Scaling(_Record):
    """Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between."""

    type: Literal["llama3"] = "llama3"
    factor: float = Field(ge=1)
    original_max_position_embeddings: int = Field(gt=0)
    low_freq_factor: float = Field(gt=0)
    high_freq_factor: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Llama3Scaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor ({self.high_freq_factor}) must be greater than "
                             f"low_freq_factor ({self.low_freq_factor})")
        return self


RopeScaling = Annotated[Union[NoScaling, LinearScaling, DynamicScaling, YarnScaling, Llama3Scaling],
                        Field(discriminator="type")]

# family -> (HF architecture, HF model_type)
HF_FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}
_FAMILY_OF_ARCH = {arch: family for family, (arch, _) in HF_FAMILIES.items()}
_FAMILY_OF_TYPE = {mtype: family for family, (_, mtype) in HF_FAMILIES.items()}
_HF_NAME = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads", "init_std": "initializer_range"}
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "rms_norm_eps")


class ModelConfig(_Record):
    """A Llama-family decoder. `family` is the HF architecture it exports as; Qwen2 is the one
    with biases on q/k/v (HF Llama's `attention_bias` also biases o_proj, which we do not have)."""

    family: Literal["llama", "mistral", "qwen2"] = "llama"
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int | None = Field(default=None, gt=0, description="None: hidden_size // num_heads")
    max_position_embeddings: int = Field(gt=0)
    rms_norm_eps: float = Field(default=1e-5, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    rope_scaling: RopeScaling = NoScaling()
    tie_word_embeddings: bool = False
    qkv_bias: bool | None = Field(default=None, description="None: as the family has it")
    init_std: float = Field(default=0.02, gt=0)
    attention_backend: Literal["sdpa", "flash_attn", "flash_attn_4", "eager"] = "sdpa"

    @model_validator(mode="before")
    @classmethod
    def _derive_defaults(cls, data: Any) -> Any:
        """Fill head_dim and qkv_bias from the other fields, so they are always concrete."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("head_dim") is None:
            try:  # flags arrive as strings; a bad value is named by the field's own check
                hidden, heads = int(data["hidden_size"]), int(data["num_heads"])
            except (KeyError, TypeError, ValueError):
                hidden = heads = 0
            if heads > 0:
                if hidden % heads:
                    raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}; "
                                     "set head_dim explicitly")
                data["head_dim"] = hidden // heads
        if data.get("qkv_bias") is None:
            data["qkv_bias"] = data.get("family", "llama") == "qwen2"
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.attention_backend == "flash_attn_4" and (self.head_dim % 8 or not 8 <= self.head_dim <= 256):
            raise ValueError(f"attention_backend 'flash_attn_4' needs head_dim a multiple of 8 "
                             f"between 8 and 256 (its Hopper kernels), not {self.head_dim}: use 'sdpa'")
        if self.qkv_bias != (self.family == "qwen2"):
            raise ValueError(f"qkv_bias={self.qkv_bias} does not fit family {self.family!r}: "
                             "only qwen2 has q/k/v biases (and always has them)")
        return self

    def num_parameters(self) -> int:
        """The model's parameter count, from its shape alone (no weights needed)."""
        hidden = self.hidden_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = 2 * hidden * q + 2 * hidden * kv + ((q + 2 * kv) if self.qkv_bias else 0)
        block = attention + 3 * hidden * self.intermediate_size + 2 * hidden
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.vocab_size * hidden + self.num_layers * block + hidden

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Read an HF `config.json` dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`
        form). Settings that would change the computation but that this model lacks are errors."""
        family = _hf_family(hf)
        missing = [key for key in _HF_REQUIRED if hf.get(key) is None]
        if missing:
            raise InputError(f"HF config lacks {', '.join(missing)}")
        _reject_unsupported(hf, family)
        theta, scaling = _read_hf_rope(hf)
        fields = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            max_position_embeddings=hf["max_position_embeddings"],
            rms_norm_eps=hf["rms_norm_eps"],
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            init_std=hf.get("initializer_range", 0.02),
        )
        try:
            return cls.model_validate({**fields, **overrides})
        except ValidationError as exc:
            raise InputError("; ".join(map(_hf_problem, exc.errors()))) from None

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict that transformers (4.57+ and 5.x) and vLLM load as this model."""
        arch, model_type = HF_FAMILIES[self.family]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": _hf_rope_scaling(self.rope_scaling),
            "rope_parameters": {"rope_theta": self.rope_theta,
                                **(_hf_rope_scaling(self.rope_scaling) or {"rope_type": "default"})},
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "initializer_range": self.init_std,
            "attention_dropout": 0.0,
        }
        if self.family == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        elif self.family == "mistral":
            out.update(sliding_window=None)
        else:
            out.update(use_sliding_window=False)
        return out


def _hf_problem(error: dict[str, Any]) -> str:
    """A validation error of a config read from HF, under config.json's names."""
    loc = [_HF_NAME.get(str(part), str(part)) for part in error["loc"]]
    msg = error["msg"].removeprefix("Value error, ")
    return f"{'.'.join(loc)}: {msg}" if loc else msg


def _hf_family(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in _FAMILY_OF_ARCH:
            return _FAMILY_OF_ARCH[arch]
    if not archs and hf.get("model_type") in _FAMILY_OF_TYPE:
        return _FAMILY_OF_TYPE[hf["model_type"]]
    name = archs[0] if archs else hf.get("model_type")
    raise InputError(f"unsupported HF architecture {name!r} (supported: Llama, Mistral, Qwen2)")


def _reject_unsupported(hf: dict[str, Any], family: str) -> None:
    """HF settings that change the computation and have no equivalent here."""
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (only 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("attention_bias / mlp_bias (o_proj and MLP biases)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append("partial_rotary_factor != 1")
    window = None
    if family == "mistral":
        window = hf.get("sliding_window", 4096)  # MistralConfig's default
    elif family == "qwen2" and hf.get("use_sliding_window"):
        window = hf.get("sliding_window", 4096)
    if window is not None and window < hf["max_position_embeddings"]:
        problems.append(f"sliding-window attention (sliding_window={window})")
    if problems:
        raise InputError(f"HF {HF_FAMILIES[family][0]} config uses what this engine does not "
                         f"support: {'; '.join(problems)}")


def _read_hf_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(theta, our rope_scaling) from either HF form; 4.x's `rope_scaling` wins, as in 5.x."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", None) or params.pop("type", "default")
    params.pop("type", None)
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise InputError("HF config uses partial_rotary_factor != 1, which this engine does not "
                         "support")
    if kind == "default":
        return theta, {"type": "none"}
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise InputError(f"unsupported RoPE type {kind!r} (supported: default, linear, dynamic, "
                         "yarn, llama3)")
    if kind in ("yarn", "llama3") and params.get("original_max_position_embeddings") is None:
        params["original_max_position_embeddings"] = hf["max_position_embeddings"]
    if kind == "yarn":  # HF treats a null beta as its default
        params = {k: v for k, v in params.items() if v is not None}
    return theta, {"type": kind, **params}


def _hf_rope_scaling(scaling: NoScaling | LinearScaling | DynamicScaling | YarnScaling
                     | Llama3Scaling) -> dict[str, Any] | None:
    if isinstance(scaling, NoScaling):
        return None
    fields = scaling.model_dump(exclude={"type"}, exclude_none=True)
    if isinstance(scaling, YarnScaling) and scaling.truncate:
        del fields["truncate"]  # the default; older transformers warn about the key
    return {"rope_type": scaling.type, **fields}
