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

from miniinfer.kernels._common import next_pow2, pdl_launch
from miniinfer.kernels.pdl import pdl_wait


@triton.jit
def load_cos_sin(pos_ptr, cs_ptr, t, stride_cs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Token ``t``'s fp32 cos and sin rows ``[1, BLOCK_HALF]`` (0 past HALF), its offsets in a
    half ``[BLOCK_HALF]`` and their mask."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cs_row = cs_ptr + pos * stride_cs
    cos = tl.load(cs_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    sin = tl.load(cs_row + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return cos[None, :], sin[None, :], offs_d, mask_d


@triton.jit
def rope_heads_(x_row, stride_h, num_heads, cos, sin, offs_d, mask_d,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate the heads of one token in place (``x_row``: its head 0); returns the rotated
    halves ``[BLOCK_H, BLOCK_HALF]`` as stored (x's dtype) and their mask."""
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h < num_heads)[:, None] & mask_d[None, :]
    x1_ptrs = x_row + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(x_row.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(x_row.dtype.element_ty)
    tl.store(x1_ptrs, y1, mask=mask)
    tl.store(x1_ptrs + HALF, y2, mask=mask)
    return y1, y2, mask


@triton.jit
def _rope_kernel(
    pos_ptr, q_ptr, k_ptr, cs_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin, offs_d, mask_d = load_cos_sin(pos_ptr, cs_ptr, t, stride_cs, HALF, BLOCK_HALF)
    rope_heads_(q_ptr + t * stride_qt, stride_qh, num_q_heads, cos, sin, offs_d, mask_d, HALF, BLOCK_HQ)
    rope_heads_(k_ptr + t * stride_kt, stride_kh, num_k_heads, cos, sin, offs_d, mask_d, HALF, BLOCK_HK)


def rope_num_warps(elems: int) -> int:
    """Warps for a one-token program touching ``elems`` (padded) elements."""
    return 1 if elems <= 1024 else (2 if elems <= 2048 else (4 if elems <= 8192 else 8))


def check_rope_args(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, rot_dim: int) -> None:
    """AssertionError unless q ``[T, H, D]``, k ``[T, Hkv, D]`` (last dims contiguous) and the
    ``[max_pos, >= rot_dim]`` table fit an even ``rot_dim <= D``."""
    T, H, D = q.shape
    assert k.dim() == 3 and k.shape[0] == T and k.shape[2] == D, (q.shape, k.shape)
    assert q.stride(2) == 1 and k.stride(2) == 1, "last dim of q/k must be contiguous"
    assert rot_dim % 2 == 0 and 0 < rot_dim <= D
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] >= rot_dim
    assert cos_sin_cache.stride(1) == 1


def apply_rope_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                cos_sin_cache: torch.Tensor, rot_dim: int) -> None:
    """In-place NeoX RoPE on ``q [T, H, D]`` and ``k [T, Hkv, D]`` at ``positions int64[T]``."""
    check_rope_args(q, k, cos_sin_cache, rot_dim)
    T, H, _ = q.shape
    if T == 0:
        return
    half = rot_dim // 2
    block_half = next_pow2(half)
    block_hq = next_pow2(H)
    block_hk = next_pow2(k.shape[1])
    _rope_kernel[(T,)](
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        H, k.shape[1],
        HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        num_warps=rope_num_warps((block_hq + block_hk) * block_half), **pdl_launch(q.device),
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

