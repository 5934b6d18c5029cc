"""Rotary position embedding tables (default, llama3 and yarn scalings)."""
from __future__ import annotations

import math

import torch


def _yarn_find_correction_dim(num_rot: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rot * 2 * math.pi))) / (2 * math.log(base))


def _inv_freq(rot_dim: int, base: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Returns (inverse frequencies [rot_dim/2], attention scale applied to cos/sin)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        factor = scaling["factor"]
        old_ctx = scaling.get("original_max_position_embeddings", 4096)
        beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
        low = max(math.floor(_yarn_find_correction_dim(beta_fast, rot_dim, base, old_ctx)), 0)
        high = min(math.ceil(_yarn_find_correction_dim(beta_slow, rot_dim, base, old_ctx)), rot_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rot_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
        mscale = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
        return inv, mscale
    raise ValueError(f"rope_scaling.rope_type {kind!r} is not supported (default, linear, llama3, yarn)")


def build_cos_sin_cache(rot_dim: int, max_pos: int, base: float, scaling: dict | None,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """[max_pos, rot_dim] float32: cos in the first half, sin in the second."""
    with torch.device("cpu"):  # computed in float64 on the host, whatever device context is active
        inv_freq, mscale = _inv_freq(rot_dim, base, scaling)
        t = torch.arange(max_pos, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        cache = torch.cat((freqs.cos() * mscale, freqs.sin() * mscale), dim=-1)
    return cache.to(torch.float32).to(device)
