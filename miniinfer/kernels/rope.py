"""Rotary position embedding (NeoX / rotate-half style), applied in place to q and k.

``cos_sin_cache`` is ``[max_pos, rot_dim]`` fp32: columns ``[:rot_dim/2]`` hold cos,
``[rot_dim/2:]`` hold sin. For each head vector ``x`` (last dim contiguous)::

    x1 = x[:rot/2]; x2 = x[rot/2:rot]
    x[:rot/2]    = x1 * cos - x2 * sin
    x[rot/2:rot] = x2 * cos + x1 * sin

Dims beyond ``rot_dim`` are left untouched. q/k may be strided views (e.g. column slices
of a fused qkv projection): any token / head stride works, the last dim must be stride 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from miniinfer.kernels._common import next_pow2


@triton.jit
def _rope_kernel(
    pos_ptr, q_ptr, k_ptr, cs_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cs_row = cs_ptr + pos * stride_cs
    cos = tl.load(cs_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    cos = cos[None, :]
    sin = sin[None, :]

    offs_hq = tl.arange(0, BLOCK_HQ)
    mask_q = (offs_hq < num_q_heads)[:, None] & mask_d[None, :]
    q1_ptrs = q_ptr + t * stride_qt + offs_hq[:, None] * stride_qh + offs_d[None, :]
    q1 = tl.load(q1_ptrs, mask=mask_q, other=0.0).to(tl.float32)
    q2 = tl.load(q1_ptrs + HALF, mask=mask_q, other=0.0).to(tl.float32)
    tl.store(q1_ptrs, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=mask_q)
    tl.store(q1_ptrs + HALF, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=mask_q)

    offs_hk = tl.arange(0, BLOCK_HK)
    mask_k = (offs_hk < num_k_heads)[:, None] & mask_d[None, :]
    k1_ptrs = k_ptr + t * stride_kt + offs_hk[:, None] * stride_kh + offs_d[None, :]
    k1 = tl.load(k1_ptrs, mask=mask_k, other=0.0).to(tl.float32)
    k2 = tl.load(k1_ptrs + HALF, mask=mask_k, other=0.0).to(tl.float32)
    tl.store(k1_ptrs, (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty), mask=mask_k)
    tl.store(k1_ptrs + HALF, (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty), mask=mask_k)


def apply_rope_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                cos_sin_cache: torch.Tensor, rot_dim: int) -> None:
    """In-place NeoX RoPE on ``q [T, H, D]`` and ``k [T, Hkv, D]`` at ``positions int64[T]``."""
    T, H, D = q.shape
    assert k.shape[0] == T and k.shape[2] == D, (q.shape, k.shape)
    assert q.stride(2) == 1 and k.stride(2) == 1, "last dim of q/k must be contiguous"
    assert rot_dim % 2 == 0 and rot_dim <= D
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] >= rot_dim
    assert cos_sin_cache.stride(1) == 1
    if T == 0:
        return
    half = rot_dim // 2
    block_half = next_pow2(half)
    block_hq = next_pow2(H)
    block_hk = next_pow2(k.shape[1])
    elems = (block_hq + block_hk) * block_half
    num_warps = 1 if elems <= 1024 else (2 if elems <= 2048 else (4 if elems <= 8192 else 8))
    _rope_kernel[(T,)](
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        H, k.shape[1],
        HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        num_warps=num_warps,
    )


def apply_rope_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   cos_sin_cache: torch.Tensor, rot_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference: returns rotated copies of q and k (fp32 math)."""
    half = rot_dim // 2
    cs = cos_sin_cache[positions.long()].float()
    cos = cs[:, None, :half]
    sin = cs[:, None, half:rot_dim]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:rot_dim]
        out = xf.clone()
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:rot_dim] = x2 * cos + x1 * sin
        return out.to(x.dtype)

    return rot(q), rot(k)

