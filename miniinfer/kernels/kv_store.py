"""Scatter a step's new K/V into the paged cache.

``k_cache``/``v_cache`` are ``[num_blocks, block_size, Hkv, D]``; token ``t`` goes to slot
``slot_mapping[t] = block * block_size + offset``. Slot ``-1`` (any negative) is skipped, so
padded CUDA-graph batches are harmless. ``k``/``v`` may be strided views (token and head
strides arbitrary, last dim contiguous); the caches may have any strides with a
contiguous last dim.

FP8 cache (``float8_e4m3fn``, the ``FP8`` variant): each value is stored as
``x / scale`` (``k_scale`` / ``v_scale``, per-tensor floats, default 1.0) computed in fp32 and
saturated to +-448 before rounding, so out-of-range values clip instead of turning into NaN.
Other cache dtypes take the plain cast (the scales are ignored). Off CUDA (Triton's CPU
interpreter, whose fp32 -> e4m3 cast loses a rounding carry: 31.6 becomes 16, not 32) the
value is first rounded to e4m3's 3 mantissa bits in fp32 (``PRE_ROUND``), so the cast is exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from miniinfer.kernels._common import FP8_E4M3_MAX, is_fp8, next_pow2, pdl_launch, quantize_fp8
from miniinfer.kernels.pdl import pdl_wait


@triton.jit
def _round_to_e4m3_mantissa(x):
    """fp32 ``x`` rounded (to nearest even) to 3 mantissa bits, by integer ops on its bits."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFFF + ((b >> 20) & 1)) & -0x100000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    num_heads, block_size, k_inv_scale, v_inv_scale,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    FP8: tl.constexpr, FP8_MAX: tl.constexpr, PRE_ROUND: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
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
        if FP8:  # quantize in fp32, saturated (e4m3 has no inf: an overflow would be NaN)
            k = tl.minimum(tl.maximum(k.to(tl.float32) * k_inv_scale, -FP8_MAX), FP8_MAX)
            v = tl.minimum(tl.maximum(v.to(tl.float32) * v_inv_scale, -FP8_MAX), FP8_MAX)
            if PRE_ROUND:
                k = _round_to_e4m3_mantissa(k)
                v = _round_to_e4m3_mantissa(v)
        vc = vc_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
        tl.store(kc, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=mask)


def check_kv_store_args(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """AssertionError unless ``k, v [T, Hkv, D]`` fit ``k_cache, v_cache [blocks, block_size,
    Hkv, D]`` (last dims contiguous) and ``slot_mapping`` has >= T entries."""
    T, Hkv, D = k.shape
    assert v.shape == k.shape, (k.shape, v.shape)
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (Hkv, D), (k_cache.shape, k.shape)
    assert v_cache.shape == k_cache.shape
    assert slot_mapping.shape[0] >= T
    assert k.stride(2) == 1 and v.stride(2) == 1
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Write ``k, v [T, Hkv, D]`` into ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``.

    ``k_scale``/``v_scale`` (floats > 0) apply to an FP8 cache only: stored = x / scale."""
    check_kv_store_args(k, v, k_cache, v_cache, slot_mapping)
    T, Hkv, D = k.shape
    if T == 0:
        return
    block_h, block_d = next_pow2(Hkv), next_pow2(D)
    elems = block_h * block_d
    num_warps = 1 if elems <= 512 else (2 if elems <= 2048 else 4)
    fp8 = is_fp8(k_cache.dtype)
    assert is_fp8(v_cache.dtype) == fp8 and (not fp8 or (k_scale > 0 and v_scale > 0)), (k_scale, v_scale)
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Hkv, k_cache.shape[1], 1.0 / k_scale, 1.0 / v_scale,
        D=D, BLOCK_H=block_h, BLOCK_D=block_d, FP8=fp8, FP8_MAX=FP8_E4M3_MAX,
        PRE_ROUND=fp8 and k_cache.device.type != "cuda", num_warps=num_warps, **pdl_launch(k.device),
    )


def store_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """In-place torch reference (same semantics)."""
    T = k.shape[0]
    slots = slot_mapping[:T].long()
    keep = slots >= 0
    slots = slots[keep]
    bs = k_cache.shape[1]
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if is_fp8(cache.dtype):  # fp8 has no CPU index-put: write its bytes
            cache.view(torch.uint8)[slots // bs, slots % bs] = quantize_fp8(x[keep], scale).view(torch.uint8)
        else:
            cache[slots // bs, slots % bs] = x[keep].to(cache.dtype)
