"""Elementwise ops the models use, with a torch path (reference), a Triton path (CUDA) and,
for fp32 CPU tensors, the C kernels of ``kernels/cpu_kernels.c`` where they build. Each
function picks Triton for CUDA tensors when Triton is present, C for CPU ones when it can."""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from miniinfer.kernels import cpu_kernels


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and _triton_available()


def _use_cpu_kernels(x: torch.Tensor) -> bool:
    """fp32 CPU rows the C element-wise kernels take (kernels/cpu_kernels.c), when they build.
    (Called several times per layer: attribute checks only, the build result is cached.)"""
    return (x.is_cpu and x.dtype == torch.float32 and x.shape[-1] % 16 == 0 and x.is_contiguous()
            and cpu_kernels.available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_triton(x):
        from miniinfer.kernels.norm import rms_norm as k
        return k(x, weight, eps)
    if _use_cpu_kernels(x) and weight.dtype == torch.float32:
        return cpu_kernels.rms_norm(x, weight, eps)
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
    if (_use_cpu_kernels(x) and _use_cpu_kernels(residual) and weight.dtype == torch.float32
            and x.shape == residual.shape):
        return cpu_kernels.rms_norm(x, weight, eps, residual=residual), residual  # residual in place
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _use_triton(x):
        from miniinfer.kernels.activation import silu_and_mul as k
        return k(x)
    if _use_cpu_kernels(x) and x.shape[-1] % 32 == 0:
        return cpu_kernels.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_tables(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> RopeTables | None:
    """The step's cos/sin rows for the torch path, gathered once and shared by every layer
    (``None`` where the Triton kernel reads the cache itself)."""
    if _use_triton(positions):
        return None
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, rot/2] each
    # laid out as [T, 1 (heads), 2 (halves), rot/2] to rotate x viewed the same way
    return RopeTables(torch.stack((cos, cos), 1).unsqueeze(1), torch.stack((-sin, sin), 1).unsqueeze(1))


class RopeTables(NamedTuple):
    cos: torch.Tensor  # [T, 1, 2, rot/2]: cos in both halves
    sin: torch.Tensor  # [T, 1, 2, rot/2]: -sin in the first half, sin in the second


def rotate(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """NeoX rotation of x [T, heads, D] (its first rot_dim dims) into a new tensor:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), computed in fp32."""
    t, heads, d = x.shape
    half = tables.cos.shape[-1]
    xr = x[..., :2 * half].float().view(t, heads, 2, half)
    out = (xr * tables.cos + xr.flip(-2) * tables.sin).view(t, heads, 2 * half).to(x.dtype)
    if 2 * half == d:
        return out
    return torch.cat((out, x[..., 2 * half:]), dim=-1)


def rotate_leading_heads(x: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """NeoX rotation of the first ``heads`` heads of each row of ``x [T, ...]`` (q and k side by
    side in the qkv output) into a new ``[T, heads, head_dim]``: C on fp32 CPU, else torch."""
    if _use_cpu_kernels(x):
        return cpu_kernels.rope_neox(x, heads, head_dim, positions, cos_sin_cache)
    return rotate(x[:, :heads * head_dim].view(x.shape[0], heads, head_dim), tables)


def apply_rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin_cache: torch.Tensor, rot_dim: int,
               tables: RopeTables | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style rotary embedding on q [T, H, D] and k [T, Hkv, D] (in place on CUDA)."""
    if _use_triton(q):
        from miniinfer.kernels.rope import apply_rope_ as kern
        kern(positions, q, k, cos_sin_cache, rot_dim)
        return q, k
    if tables is None:
        tables = rope_tables(positions, cos_sin_cache)
    return rotate(q, tables), rotate(k, tables)
