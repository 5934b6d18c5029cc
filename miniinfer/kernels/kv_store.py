"""Scatter a step's new K/V into the paged cache.

``k_cache``/``v_cache`` are ``[num_blocks, block_size, Hkv, D]``; token ``t`` goes to slot
``slot_mapping[t] = block * block_size + offset``. Slot ``-1`` (any negative) is skipped, so
padded CUDA-graph batches are harmless. ``k``/``v`` may be strided views (token and head
strides arbitrary, last dim contiguous); the caches may have any strides with a
contiguous last dim.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from miniinfer.kernels._common import next_pow2


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    num_heads, block_size,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < num_heads)[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        kc = kc_ptr + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
        vc = vc_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
        tl.store(kc, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``k, v [T, Hkv, D]`` into ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``."""
    T, Hkv, D = k.shape
    assert v.shape == k.shape, (k.shape, v.shape)
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (Hkv, D), (k_cache.shape, k.shape)
    assert v_cache.shape == k_cache.shape
    assert slot_mapping.shape[0] >= T
    assert k.stride(2) == 1 and v.stride(2) == 1
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    if T == 0:
        return
    block_h, block_d = next_pow2(Hkv), next_pow2(D)
    elems = block_h * block_d
    num_warps = 1 if elems <= 512 else (2 if elems <= 2048 else 4)
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Hkv, k_cache.shape[1],
        D=D, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
    )


def store_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """In-place torch reference (same semantics)."""
    T = k.shape[0]
    slots = slot_mapping[:T].long()
    keep = slots >= 0
    slots = slots[keep]
    bs = k_cache.shape[1]
    k_cache[slots // bs, slots % bs] = k[keep].to(k_cache.dtype)
    v_cache[slots // bs, slots % bs] = v[keep].to(v_cache.dtype)
