"""RoPE and the paged KV-cache store in one kernel (the Triton attention backend's
``forward_with_rope``): one launch per layer instead of ``kernels/rope.py`` then
``kernels/kv_store.py``.

    rope_store_kv_cache_(positions, q, k, v, cos_sin_cache, rot_dim, k_cache, v_cache, slot_mapping)

One program per token: NeoX-rotates its q heads and k heads in place (as ``apply_rope_``,
through the same jitted helpers, so the stored values are identical), then writes the rotated k
(as just stored, i.e. rounded to k's dtype, then cast to the cache's dtype) and v into the cache
at ``slot_mapping[t]`` (negative: skipped, so padded CUDA-graph rows are harmless), exactly
what ``store_kv_cache`` would write after ``apply_rope_``. Dims past ``rot_dim`` are copied
unrotated. No host syncs: capturable in a CUDA graph, any T (decode, prefill, extend).

Not for FP8 caches (their quantizing store stays in ``kv_store.py``): AssertionError.

Shapes / dtypes: ``positions`` int ``[T]``; q ``[T, H, D]``, k and v ``[T, Hkv, D]`` (any token /
head strides, e.g. column views of the fused qkv output; last dim contiguous), one float dtype;
``cos_sin_cache`` fp32 ``[max_pos, >= rot_dim]`` (cos then sin, as ``kernels/rope.py``);
caches ``[num_blocks, block_size, Hkv, D]`` (last dim contiguous), a non-FP8 float dtype;
``slot_mapping`` int64 ``[>= T]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from miniinfer.kernels._common import is_fp8, next_pow2, pdl_launch
from miniinfer.kernels.kv_store import check_kv_store_args
from miniinfer.kernels.pdl import pdl_wait
from miniinfer.kernels.rope import load_cos_sin, rope_heads_, check_rope_args, rope_num_warps


@triton.jit
def _rope_kv_store_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    num_q_heads, num_k_heads, block_size,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TAIL: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Token t = program 0: rotate q[t] and k[t] in place; if slot[t] >= 0 store k[t] (rotated)
    and v[t] at cache[slot // block_size, slot % block_size]. BLOCK_TAIL > 0: dims
    [2 * HALF, D) are not rotated and are copied as they are."""
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin, offs_d, mask_d = load_cos_sin(pos_ptr, cs_ptr, t, stride_cs, HALF, BLOCK_HALF)
    rope_heads_(q_ptr + t * stride_qt, stride_qh, num_q_heads, cos, sin, offs_d, mask_d, HALF, BLOCK_HQ)
    k_row = k_ptr + t * stride_kt
    k1, k2, mask = rope_heads_(k_row, stride_kh, num_k_heads, cos, sin, offs_d, mask_d, HALF, BLOCK_HK)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        offs_h = tl.arange(0, BLOCK_HK)
        live_h = (offs_h < num_k_heads)[:, None]
        kc = kc_ptr + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch
        tl.store(kc + offs_d[None, :], k1.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(kc + HALF + offs_d[None, :], k2.to(kc_ptr.dtype.element_ty), mask=mask)
        if BLOCK_TAIL > 0:  # partial rotary: the rest of k unrotated (not written above)
            offs_r = 2 * HALF + tl.arange(0, BLOCK_TAIL)
            mask_r = live_h & (offs_r < D)[None, :]
            k_tail = tl.load(k_row + offs_h[:, None] * stride_kh + offs_r[None, :], mask=mask_r)
            tl.store(kc + offs_r[None, :], k_tail.to(kc_ptr.dtype.element_ty), mask=mask_r)
        offs_v = tl.arange(0, BLOCK_D)
        mask_v = live_h & (offs_v < D)[None, :]
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_v[None, :], mask=mask_v)
        vc = vc_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_v[None, :]
        tl.store(vc, v.to(vc_ptr.dtype.element_ty), mask=mask_v)


def rope_store_kv_cache_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cos_sin_cache: torch.Tensor, rot_dim: int, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``apply_rope_(positions, q, k, cos_sin_cache, rot_dim)`` then ``store_kv_cache(k, v,
    k_cache, v_cache, slot_mapping)`` in one launch (same results; see the module doc for
    shapes). Raises AssertionError on mismatched shapes / layouts or an FP8 cache."""
    check_rope_args(q, k, cos_sin_cache, rot_dim)
    check_kv_store_args(k, v, k_cache, v_cache, slot_mapping)
    assert not is_fp8(k_cache.dtype) and not is_fp8(v_cache.dtype), "FP8 caches take store_kv_cache"
    T, H, D = q.shape
    Hkv = k.shape[1]
    assert positions.shape[0] >= T, (positions.shape, T)
    if T == 0:
        return
    half = rot_dim // 2
    block_half, block_hq, block_hk, block_d = next_pow2(half), next_pow2(H), next_pow2(Hkv), next_pow2(D)
    block_tail = next_pow2(D - rot_dim) if rot_dim < D else 0
    elems = (block_hq + block_hk) * block_half + block_hk * block_d
    _rope_kv_store_kernel[(T,)](
        positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        H, Hkv, k_cache.shape[1],
        D=D, HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
        BLOCK_TAIL=block_tail, num_warps=rope_num_warps(elems), **pdl_launch(q.device),
    )
