"""Paged decode attention (one query token per sequence), split-KV flash-decoding.

Layout::

    q            [B, H, D]            (any batch/head strides, last dim contiguous)
    k/v_cache    [num_blocks, block_size, Hkv, D]
    block_tables int32 [B, max_blocks] page ids of each sequence, in order
    seq_lens     int32 [B]            number of cached tokens to attend to (incl. this step's)

Stage 1: grid ``(B, Hkv, num_splits)``. Each program owns one KV head and *all* of its
``G = H / Hkv`` query heads (so ``tl.dot`` has M = G padded to 16) and one partition of
the context (sized on the device, see below), walking it in tiles of ``BLOCK_N`` tokens gathered through the
block table; online softmax with fp32 accumulation. It writes a normalised partial output
and its log-sum-exp (base 2) into fp32 workspaces. Stage 2 (grid ``(B, H)``) merges the
partitions. With a single split, stage 1 writes the output directly and stage 2 is skipped.

CUDA graphs: nothing here reads device memory on the host. The split count (the grid's
third dimension) depends only on host ints (``B``, ``Hkv``, an upper bound on the context,
the SM count); each program derives its partition from the sequence's *actual* length on
the device, ``partition = ceil(ceil(seq_len / BLOCK_N) / num_splits) * BLOCK_N`` tokens (at
least ``min_part``: ``_LONG_MIN_PARTITION`` when a full batch splits for a long bound). So
a graph captured with a loose bound (``max_model_len``) still spreads a short context over
many programs instead of handing it all to the first split, and any bound is correct.

FP8 cache (``float8_e4m3fn``, the ``FP8`` variant): K/V tiles are converted to fp16 (exact) and
the dots run in fp16 with q (``F16_DOT``, see ``_common.fp16_dots``; fp32 queries: fp32), and
the per-tensor scales are folded in: ``k_scale`` into the qk scale, ``v_scale`` into each
partition's normalised output (linear, so stage 2 is unchanged).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from miniinfer.kernels._common import (dot_precision, dot_upcast, fp16_dots, is_fp8, next_pow2, num_sms,
                                       pages_f32, pdl_launch)
from miniinfer.kernels.pdl import pdl_wait

_LOG2E = 1.4426950408889634
_MIN_PARTITION = 128  # tokens: below this, splitting costs more than it buys (untuned)
_MAX_SPLITS = 128
_STAGE2_BLOCK_S = 16  # partitions merged per step (fixed: no recompiles as contexts grow)
_LONG_MIN_PARTITION = 1024  # tokens: the smallest partition of a full batch's long-bound split


# Ints that vary from step to step (block-table width, split count and the workspace strides
# that follow it) are not specialized: a new "== 1" / "multiple of 16" variant would compile
# a fresh kernel in the middle of serving, after warmup.
_VARYING = ["stride_bt", "stride_mob", "stride_moh", "stride_mlb", "stride_mlh", "num_splits", "min_part"]


@triton.jit(do_not_specialize=_VARYING)
def _decode_stage1_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, sl_ptr, mo_ptr, ml_ptr, out_ptr,
    qk_scale, v_scale,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_mob, stride_moh, stride_mos,
    stride_mlb, stride_mlh,
    stride_ob, stride_oh,
    num_splits, min_part,
    G: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, FP8: tl.constexpr,
    F16_DOT: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(sl_ptr + b)
    part = tl.maximum(tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits) * BLOCK_N, min_part)
    start = s * part
    end = tl.minimum(seq_len, start + part)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = kvh * G + offs_g
    mask_gd = mask_g[:, None] & mask_d[None, :]

    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_gd, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if F16_DOT:  # FP8 cache: the dots in fp16 (_common.fp16_dots; |q| clamped to fp16's range)
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    for n0 in range(start, end, BLOCK_N):
        offs = n0 + offs_n
        mask_n = offs < end
        page = tl.load(bt_row + offs // PAGE, mask=mask_n, other=0).to(tl.int64)
        within = offs % PAGE
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(kc_ptr + (page * stride_kb + within * stride_ks + kvh * stride_kh)[:, None]
                    + offs_d[None, :], mask=mask_nd, other=0.0)
        v = tl.load(vc_ptr + (page * stride_vb + within * stride_vs + kvh * stride_vh)[:, None]
                    + offs_d[None, :], mask=mask_nd, other=0.0)
        if FP8:  # e4m3 -> q's dtype (exact); k_scale is in qk_scale, v_scale applied to o
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        elif UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if FP8:
        o = o * v_scale
    if DIRECT:
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask_gd)
    else:
        valid = start < seq_len
        mo = mo_ptr + b.to(tl.int64) * stride_mob + heads[:, None] * stride_moh + s * stride_mos
        tl.store(mo + offs_d[None, :], o, mask=mask_gd & valid)
        lse = m_i + tl.log2(l_safe)
        tl.store(ml_ptr + b.to(tl.int64) * stride_mlb + heads * stride_mlh + s, lse, mask=mask_g & valid)


@triton.jit(do_not_specialize=_VARYING[1:])
def _decode_stage2_kernel(
    mo_ptr, ml_ptr, sl_ptr, out_ptr,
    stride_mob, stride_moh, stride_mos,
    stride_mlb, stride_mlh,
    stride_ob, stride_oh,
    num_splits, min_part,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    # Merge the non-empty partitions, BLOCK_S at a time, with a running log-sum-exp.
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(sl_ptr + b)
    part = tl.maximum(tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits) * BLOCK_N, min_part)  # as in stage 1
    n_valid = tl.minimum(tl.cdiv(seq_len, tl.maximum(part, 1)), num_splits)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    ml_row = ml_ptr + b.to(tl.int64) * stride_mlb + h * stride_mlh
    mo_row = mo_ptr + b.to(tl.int64) * stride_mob + h * stride_moh
    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    den = tl.full([], 0.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_valid, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < n_valid
        lse = tl.load(ml_row + offs_s, mask=mask_s, other=float("-inf"))
        m_new = tl.maximum(m_i, tl.max(lse, 0))
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse - m_new)
        o = tl.load(mo_row + offs_s[:, None] * stride_mos + offs_d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        den = den * alpha + tl.sum(w, 0)
        m_i = m_new
    den = tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d,
             (acc / den).to(out_ptr.dtype.element_ty), mask=mask_d)


def _default_block_n(head_dim: int, fp8: bool = False) -> int:
    if fp8 and head_dim <= 128:  # half the bytes per key: twice the keys per tile (H200: 645 -> 542 us)
        return 128
    return 64 if head_dim <= 128 else 32


def _fills_sms(programs: int, device: torch.device) -> bool:
    """Whether one program per (sequence, KV head) already fills the SMs twice over."""
    return programs >= 2 * num_sms(device)


def decode_split_config(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                        num_splits: int | None = None, block_n: int | None = None,
                        head_dim: int = 128) -> int:
    """The number of KV partitions per (sequence, KV head); depends only on host ints.

    Few programs: enough splits to fill the SMs about eight times over, but no more than there
    are ``_MIN_PARTITION``-token pieces in the bound (stage 2 would cost more than it saves).
    Programs enough to fill the SMs: one split, or with a bound of 16k tokens and more 2 to 4
    (``bound // 8192``), which evens out contexts of unequal length. The bound is the capture
    bound under CUDA graphs (``max_model_len``), so the kernel then gives partitions of at least
    ``_LONG_MIN_PARTITION`` tokens: a short context stays one partition."""
    block_n = block_n or _default_block_n(head_dim)
    max_seq_len = max(int(max_seq_len), 1)
    if num_splits is None:
        programs = max(batch * num_kv_heads, 1)
        target = 2 * num_sms(device)
        if _fills_sms(programs, device):
            # long contexts: finer partitions even out the tail of a batch of unequal lengths
            # (H200, 128 contexts of 4k-8k tokens: 1 split 843 us, 2 splits 800, 4 splits 764)
            num_splits = min(4, max(1, max_seq_len // 8192))
        else:
            num_splits = min(triton.cdiv(target * 4, programs),
                             triton.cdiv(max_seq_len, _MIN_PARTITION), _MAX_SPLITS)
    return max(1, min(int(num_splits), triton.cdiv(max_seq_len, block_n)))


def decode_workspace_shapes(batch: int, num_heads: int, head_dim: int,
                            num_splits: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the fp32 ``(mid_out, mid_lse)`` workspaces for ``num_splits > 1``."""
    return (batch, num_heads, num_splits, head_dim), (batch, num_heads, num_splits)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, num_splits: int | None = None,
                           max_seq_len: int | None = None,
                           mid_out: torch.Tensor | None = None,
                           mid_lse: torch.Tensor | None = None,
                           block_n: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                           f16_dot: bool | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its paged KV; returns ``out [B, H, D]``.

    ``max_seq_len`` (host int) bounds ``seq_lens`` for picking the split count (a loose or
    even wrong bound only costs speed); default: ``max_blocks * block_size`` (never syncs).
    ``num_splits`` forces a split count. ``mid_out``/``mid_lse`` are optional fp32
    workspaces (shapes from :func:`decode_workspace_shapes`, split dim may be larger).
    ``k_scale``/``v_scale``: an FP8 cache's per-tensor scales (value = fp8 * scale); ignored
    for other cache dtypes.
    """
    B, H, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape, (q.shape, k_cache.shape, v_cache.shape)
    assert H % Hkv == 0, f"num_heads {H} must be a multiple of num_kv_heads {Hkv}"
    assert page & (page - 1) == 0, "block_size must be a power of two"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert block_tables.dim() == 2 and block_tables.shape[0] >= B and seq_lens.shape[0] >= B
    assert block_tables.stride(1) == 1
    if out is None:
        out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    assert out.shape == (B, H, D) and out.stride(2) == 1
    if B == 0:
        return out
    G = H // Hkv
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * page
    fp8 = is_fp8(k_cache.dtype)
    block_n = block_n or _default_block_n(D, fp8)
    splits = decode_split_config(B, Hkv, max_seq_len, q.device, num_splits, block_n, D)
    # A full batch split only for its long bound: contexts under _LONG_MIN_PARTITION tokens keep
    # one partition (no split work for short contexts), and 4k+ ones split as measured.
    full = num_splits is None and _fills_sms(B * Hkv, q.device)
    min_part = _LONG_MIN_PARTITION if full and splits > 1 else block_n
    if num_stages is None:
        num_stages = 3 if fp8 else 2  # fp8 + 128-key tiles: 542 -> 536 us
    block_d = next_pow2(D)
    block_g = max(16, next_pow2(G))
    direct = splits == 1
    if direct:
        mo = ml = out  # unused
        mo_strides, ml_strides = (0, 0, 0), (0, 0)
    else:
        mo_shape, ml_shape = decode_workspace_shapes(B, H, D, splits)
        if mid_out is None:
            mid_out = torch.empty(mo_shape, dtype=torch.float32, device=q.device)
        if mid_lse is None:
            mid_lse = torch.empty(ml_shape, dtype=torch.float32, device=q.device)
        assert mid_out.dtype == torch.float32 and mid_lse.dtype == torch.float32
        assert mid_out.shape[0] >= B and mid_out.shape[1] == H and mid_out.shape[2] >= splits
        assert mid_out.shape[3] == D and mid_out.stride(3) == 1
        assert mid_lse.shape[0] >= B and mid_lse.shape[1] == H and mid_lse.shape[2] >= splits
        assert mid_lse.stride(2) == 1
        mo, ml = mid_out, mid_lse
        mo_strides = (mid_out.stride(0), mid_out.stride(1), mid_out.stride(2))
        ml_strides = (mid_lse.stride(0), mid_lse.stride(1))
    if num_warps is None:
        num_warps = 8 if (block_d > 64 and block_g > 16) else 4
    f16_dot = fp16_dots(k_cache.dtype, q.dtype, f16_dot)
    qk_scale = scale * _LOG2E * k_scale if fp8 else scale * _LOG2E
    pdl = pdl_launch(q.device)
    _decode_stage1_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, mo, ml, out,
        qk_scale, v_scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        *mo_strides, *ml_strides,
        out.stride(0), out.stride(1),
        splits, min_part,
        G=G, PAGE=page, D=D, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
        DIRECT=direct, UPCAST=dot_upcast(q.dtype, q.device), PREC=dot_precision(q.dtype), FP8=fp8,
        F16_DOT=f16_dot, num_warps=num_warps, num_stages=num_stages, **pdl,
    )
    if not direct:
        _decode_stage2_kernel[(B, H)](
            mo, ml, seq_lens, out,
            *mo_strides, *ml_strides,
            out.stride(0), out.stride(1),
            splits, min_part,
            D=D, BLOCK_S=_STAGE2_BLOCK_S, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=2, **pdl,
        )
    return out


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Per-sequence torch reference (fp32 math, host loop; reads seq_lens on the host).
    An FP8 cache is dequantized (``fp8 * scale``) before the math."""
    B, H, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    out = torch.zeros_like(q)
    for b in range(B):
        L = int(seq_lens[b])
        if L == 0:
            continue
        pages = block_tables[b, : math.ceil(L / page)].long()
        k = pages_f32(k_cache, pages, k_scale)[:L]  # [L, Hkv, D]
        v = pages_f32(v_cache, pages, v_scale)[:L]
        k = k.repeat_interleave(G, dim=1)  # [L, H, D]
        v = v.repeat_interleave(G, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        probs = scores.softmax(dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", probs, v).to(q.dtype)
    return out

