"""Elementwise ops the models use, with a torch path (CPU, reference) and a Triton path
(CUDA). Each function picks the Triton kernel for CUDA tensors when Triton is present."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and _triton_available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_triton(x):
        from miniinfer.kernels.norm import rms_norm as k
        return k(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual <- x + residual; returns (rms_norm(residual) * weight, residual)."""
    if _use_triton(x):
        from miniinfer.kernels.norm import fused_add_rms_norm_ as k
        k(x, residual, weight, eps)
        return x, residual
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _use_triton(x):
        from miniinfer.kernels.activation import silu_and_mul as k
        return k(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin_cache: torch.Tensor, rot_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style rotary embedding on q [T, H, D] and k [T, Hkv, D]."""
    if _use_triton(q):
        from miniinfer.kernels.rope import apply_rope_ as kern
        kern(positions, q, k, cos_sin_cache, rot_dim)
        return q, k
    cos_sin = cos_sin_cache[positions]  # [T, rot]
    cos, sin = cos_sin.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xr = x[..., :rot_dim].float()
        x1, x2 = xr.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        if rot_dim == x.shape[-1]:
            return out
        return torch.cat((out, x[..., rot_dim:]), dim=-1)

    return rotate(q), rotate(k)
