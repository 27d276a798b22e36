"""Rotary position embedding in HF's rotate-half layout, with the context-extension variants
defined exactly as transformers defines them, so that a model extended here behaves the same once
exported.

The frequencies are recomputed on every forward (a few tiny kernels) instead of being kept in a
buffer: nothing to re-create after a meta-device build, and dynamic NTK, which depends on the
current length, needs no state. All of it stays on the device: no host synchronisation.
"""

from __future__ import annotations

import math

import torch

from engine.model.config import (DynamicScaling, Llama3Scaling, LinearScaling, ModelConfig,
                                 YarnScaling)


def _plain(theta: float, dim: int, device: torch.device | None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta ** exponents)


def inverse_frequencies(cfg: ModelConfig, device: torch.device | None = None,
                        seq_len: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] in fp32, factor applied to cos and sin).

    `seq_len` (a 0-d integer tensor) is the current length; only dynamic NTK reads it."""
    scaling, dim, theta = cfg.rope_scaling, cfg.head_dim, cfg.rope_theta
    if isinstance(scaling, LinearScaling):
        return _plain(theta, dim, device) / scaling.factor, 1.0
    if isinstance(scaling, DynamicScaling):
        return _dynamic_ntk(theta, dim, scaling.factor, cfg.max_position_embeddings, device,
                            seq_len), 1.0
    if isinstance(scaling, YarnScaling):
        return _yarn(theta, dim, scaling, device)
    if isinstance(scaling, Llama3Scaling):
        return _llama3(theta, dim, scaling, device), 1.0
    return _plain(theta, dim, device), 1.0


def _dynamic_ntk(theta: float, dim: int, factor: float, trained_len: int,
                 device: torch.device | None, seq_len: torch.Tensor | None) -> torch.Tensor:
    """Beyond the trained length the base grows so that the lowest frequency still spans the
    sequence; up to it, plain RoPE."""
    plain = _plain(theta, dim, device)
    if seq_len is None:
        return plain
    longer = torch.clamp(seq_len, min=trained_len)
    base = theta * ((factor * longer / trained_len) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return torch.where(seq_len > trained_len, 1.0 / (base ** exponents), plain)


def _yarn(theta: float, dim: int, s: YarnScaling,
          device: torch.device | None) -> tuple[torch.Tensor, float]:
    """High frequencies (many turns within the original context) are kept, low ones interpolated
    by `factor`, with a linear ramp between the dimensions that turn beta_fast and beta_slow
    times; cos and sin are scaled by the attention temperature."""
    factor = s.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.attention_factor is not None:
        attention_factor = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention_factor = float(mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim))
    else:
        attention_factor = mscale(factor)

    def dim_of(turns: float) -> float:
        """The dimension whose wavelength fits `turns` times into the original context."""
        orig = s.original_max_position_embeddings
        return (dim * math.log(orig / (turns * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero

    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)
    keep = 1 - torch.clamp(ramp, 0, 1)
    return interpolated * (1 - keep) + extrapolated * keep, attention_factor


def _llama3(theta: float, dim: int, s: Llama3Scaling,
            device: torch.device | None) -> torch.Tensor:
    """Wavelengths longer than orig/low_freq_factor are divided by `factor`, shorter than
    orig/high_freq_factor kept, and those between interpolated smoothly."""
    inv = _plain(theta, dim, device)
    orig = s.original_max_position_embeddings
    long_wavelen, short_wavelen = orig / s.low_freq_factor, orig / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > long_wavelen, inv / s.factor, inv)
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: ModelConfig, position_ids: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [batch or 1, seq, head_dim] for the positions, computed in fp32, cast last."""
    seq_len = position_ids.max() + 1 if isinstance(cfg.rope_scaling, DynamicScaling) else None
    inv, scale = inverse_frequencies(cfg, position_ids.device, seq_len)
    angles = position_ids.float()[..., None] * inv
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, seq, heads, head_dim]: the first half of each head pairs with the second."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin
