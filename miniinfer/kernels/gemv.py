"""Skinny GEMM for decode: ``y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N])`` for M <= 8 rows.

    from miniinfer.kernels.gemv import gemv
    y = gemv(x, linear.weight, linear.bias)   # what models.linear.Linear does on CUDA at decode

At decode batch sizes a linear layer is bound by reading its weight once: every output
``n`` reads row ``n`` of W (contiguous in K, as ``nn.Linear`` stores it). The kernel gives
each program ``BLOCK_N`` (few) output rows so the grid has many programs, streams its rows
in wide ``BLOCK_K`` chunks and keeps the M (<= 8) rows of x as a broadcast operand. Two inner
products, chosen per config:

* FMA (``use_dot=False``, M = 1 or 2): one ``[BLOCK_N, BLOCK_K]`` fp32 accumulator of
  elementwise products per x row, reduced over K once after the loop (no cross-thread
  reduction per chunk); tensor cores would waste >= 7/8 of their rows here.
* Tensor-core dot (``use_dot=True``): x padded to 16 rows, ``tl.dot(x, W_tile^T)``; for
  M = 3..8, where the FMA path's M products per weight would become compute-bound.

When N / BLOCK_N programs would leave SMs idle (o_proj 3584x3584, down_proj K=18944) the K
range is split over ``split_k`` programs that write fp32 partials ``[split_k, M, N]``; a
second small kernel sums them in a fixed order, adds bias and casts. No atomics: results are
deterministic, and the only allocation depends on shapes alone, so the call is CUDA-graph
capturable.

Ideas from public code (read, not copied): GemLite's Triton ``gemv_splitK`` kernels
(github.com/mobiusml/gemlite, ``gemlite/triton_kernels/gemv_splitK_kernels.py``: a few
output rows per program with large K tiles and split-K; it reduces with atomics, replaced
here by a two-pass reduction as in this repo's split-KV flash-decoding,
``kernels/decode_attention.py``).

SiLU-and-mul prologue (``act="silu_mul"``, the MLP's down projection): x is the gate_up
output ``[M, 2K]`` (gate in columns ``[:K]``, up in ``[K:]``, as ``kernels/activation.py``) and
each x chunk is ``silu(gate) * up`` computed in fp32 and rounded to x's dtype, exactly the
values ``silu_and_mul`` would write, so the result equals ``gemv(silu_and_mul(x), W)`` bit for
bit with the same config (one launch and one ``[M, K]`` round trip fewer per layer).

Shapes / dtypes: x ``[M, K]`` (1 <= M <= 8, rows may be strided, last dim contiguous),
weight ``[N, K]`` contiguous, bias ``[N]`` or None, all the same dtype (bf16, fp16 or fp32);
output ``[M, N]`` in that dtype (``out=`` may be given, last dim contiguous), fp32
accumulation. Errors: AssertionError on any violation of the above.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from miniinfer.kernels._common import dot_precision, dot_upcast, next_pow2, num_sms, pdl_launch
from miniinfer.kernels.pdl import pdl_wait

MAX_ROWS = 8  # largest M the kernel takes (the wrapper asserts it)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class GemvConfig:
    """Launch config. ``block_n``/``block_k`` powers of two (``block_n >= 16`` and
    ``block_k >= 16`` when ``use_dot``); ``split_k >= 1`` (clamped to the K chunks);
    ``num_stages``: software-pipeline depth of the K loop (1 = plain register loads)."""
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    use_dot: bool = False


# Per-shape configs measured on an H200 by benchmarks/gemv_bench.py (its "best_configs"
# output; 2026-11-30, M = 1 rows of the sweep: Qwen2-7B at TP 1 and 2, Qwen2-0.5B). Key: (N, K,
# row bucket) with the bucket next_pow2(M) in {1, 2, 4, 8}. Shapes missing here use the
# heuristic in gemv_config(). GB/s = weight bytes / time inside a CUDA graph (copy: 4,242).
TUNED: dict[tuple[int, int, int], GemvConfig] = {
    (4608, 3584, 1): GemvConfig(block_n=4, block_k=512, num_stages=1),  # 3352 GB/s
    (3584, 3584, 1): GemvConfig(block_n=4, block_k=1024, num_stages=1),  # 3156 GB/s
    (37888, 3584, 1): GemvConfig(block_n=8, block_k=512, num_stages=3),  # 4346 GB/s
    (3584, 18944, 1): GemvConfig(block_n=4, block_k=512, num_stages=3),  # 4113 GB/s
    (152064, 3584, 1): GemvConfig(block_n=8, block_k=512, num_stages=3),  # 4540 GB/s
    (2304, 3584, 1): GemvConfig(block_n=2, block_k=1024, num_stages=1),  # 2743 GB/s
    (3584, 1792, 1): GemvConfig(block_n=4, block_k=1024, num_stages=1),  # 2547 GB/s
    (18944, 3584, 1): GemvConfig(block_n=8, block_k=512, num_stages=1),  # 4102 GB/s
    (3584, 9472, 1): GemvConfig(block_n=4, block_k=1024, num_stages=1),  # 3768 GB/s
    (1152, 896, 1): GemvConfig(block_n=2, block_k=1024, num_stages=1),  # 859 GB/s
    (896, 896, 1): GemvConfig(block_n=2, block_k=1024, num_stages=1),  # 701 GB/s
    (9728, 896, 1): GemvConfig(block_n=4, block_k=1024, split_k=4, num_stages=1),  # 2646 GB/s
    (896, 4864, 1): GemvConfig(block_n=2, block_k=1024, num_stages=3),  # 1808 GB/s
    (151936, 896, 1): GemvConfig(block_n=8, block_k=512, num_stages=3),  # 4300 GB/s
}


def _pow2_floor(n: int) -> int:
    return 1 if n < 2 else 1 << (int(n).bit_length() - 1)


def _split_for(programs: int, k_blocks: int, sms: int, min_blocks_per_split: int = 2) -> int:
    """Smallest power-of-two split giving >= 4 programs per SM, keeping >= ``min_blocks_per_split``
    K chunks per program."""
    split = 1
    while programs * split < 4 * sms and k_blocks // (split * 2) >= min_blocks_per_split and split < 16:
        split *= 2
    return split


def gemv_config(M: int, N: int, K: int, device: torch.device) -> GemvConfig:
    """Config for ``x[M, K] @ W[N, K]^T``: the TUNED table entry if any, else a heuristic
    (few rows x wide K chunks per program; split-K when N alone gives < 4 programs per SM)."""
    bucket = next_pow2(M)
    hit = TUNED.get((N, K, bucket))
    return hit if hit is not None else _heuristic(bucket, N, K, num_sms(device))


@functools.lru_cache(maxsize=None)
def _heuristic(bucket: int, N: int, K: int, sms: int) -> GemvConfig:
    if bucket <= 2:  # FMA path: ~4096 / M W elements per chunk, few rows when N is small
        block_n = max(1, min(8, _pow2_floor(N // (4 * sms))))
        block_k = min(4096 // bucket // block_n, 2048, max(16, next_pow2(K)))
        warps = max(1, min(4, block_n * block_k // 512))
        stages = 3 if K >= 3 * block_k else 1  # cp.async prefetch only pays with a few chunks
        cfg = dict(block_n=block_n, block_k=block_k, num_warps=warps, num_stages=stages, use_dot=False)
    else:  # tensor-core path: x padded to 16 rows
        block_k = min(256, max(16, next_pow2(K)))
        block_n = 16
        cfg = dict(block_n=block_n, block_k=block_k, num_warps=4, num_stages=3, use_dot=True)
    split = _split_for(triton.cdiv(N, block_n), triton.cdiv(K, block_k), sms)
    return GemvConfig(split_k=split, **cfg)


@triton.jit
def _silu_mul(gate, up):
    """``silu(gate) * up`` in fp32: the same expression as ``kernels/activation.py`` (the fused
    prologue must round to the same values as the separate kernel)."""
    return gate / (1.0 + tl.exp(-gate)) * up


@triton.jit
def _load_x(ptrs, mask, up_off, EVEN: tl.constexpr, SILU_MUL: tl.constexpr):
    """An x chunk in x's dtype: a plain load (``mask`` ignored when EVEN), or with SILU_MUL
    ``silu(gate) * up`` from ``ptrs`` and ``ptrs + up_off``, rounded to x's dtype."""
    if SILU_MUL:
        if EVEN:
            gate = tl.load(ptrs).to(tl.float32)
            up = tl.load(ptrs + up_off).to(tl.float32)
        else:
            gate = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(ptrs + up_off, mask=mask, other=0.0).to(tl.float32)
        return _silu_mul(gate, up).to(ptrs.dtype.element_ty)
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _dot_tile(x_rows, x_live, w_rows, offs_k, kb_start, kb_end, K, up_off, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
              PREC: tl.constexpr, SILU_MUL: tl.constexpr):
    """Tensor-core inner product over K chunks [kb_start, kb_end): fp32 [BLOCK_M, BLOCK_N].
    x rows where ``x_live`` [BLOCK_M, 1] is False (padding up to 16) are masked loads of 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        ks = kb * BLOCK_K + offs_k
        if EVEN_K:
            w = tl.load(w_rows + ks[None, :], eviction_policy="evict_first")
            x = _load_x(x_rows + ks[None, :], x_live, up_off, False, SILU_MUL)
        else:
            w = tl.load(w_rows + ks[None, :], mask=ks[None, :] < K, other=0.0, eviction_policy="evict_first")
            x = _load_x(x_rows + ks[None, :], x_live & (ks[None, :] < K), up_off, False, SILU_MUL)
        if UPCAST:  # the CPU interpreter's dot cannot take bf16
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
    return acc


@triton.jit
def _fma_rows(x_row0, x_row1, w_rows, offs_k, kb_start, kb_end, K, up_off, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TWO_ROWS: tl.constexpr, STAGES: tl.constexpr,
              SILU_MUL: tl.constexpr):
    """CUDA-core inner product for one or two x rows: elementwise fp32 accumulators
    [BLOCK_N, BLOCK_K] reduced over K once at the end -> two fp32 [BLOCK_N] (the second
    equals the first when not TWO_ROWS). STAGES > 1 prefetches W chunks through shared
    memory (cp.async); 1 loads straight into registers."""
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for kb in tl.range(kb_start, kb_end, num_stages=STAGES):
        ks = kb * BLOCK_K + offs_k
        if EVEN_K:
            w = tl.load(w_rows + ks[None, :], eviction_policy="evict_first").to(tl.float32)
        else:
            w = tl.load(w_rows + ks[None, :], mask=ks[None, :] < K, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
        x0 = _load_x(x_row0 + ks, ks < K, up_off, EVEN_K, SILU_MUL).to(tl.float32)
        acc0 += w * x0[None, :]
        if TWO_ROWS:
            x1 = _load_x(x_row1 + ks, ks < K, up_off, EVEN_K, SILU_MUL).to(tl.float32)
            acc1 += w * x1[None, :]
    y0 = tl.sum(acc0, axis=1)
    if TWO_ROWS:
        return y0, tl.sum(acc1, axis=1)
    return y0, y0


@triton.jit
def _store_rows(acc, offs_m, offs_n, M, N, b_ptr, y_ptr, stride_ym, part_ptr, pid_k,
                PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store fp32 acc [R, BLOCK_N] for rows offs_m [R]: y (bias, cast) or partials part[pid_k]."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if not PARTIAL:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym,
    blocks_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
    SILU_MUL: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One program: rows [pid_n*BLOCK_N, +BLOCK_N) of W over K chunks
    [pid_k*blocks_per_split, +blocks_per_split) * BLOCK_K; all M rows of x.
    PARTIAL=False writes y (bias added, cast); else fp32 partials part[pid_k, m, n].
    SILU_MUL: x rows are [gate (K) | up (K)], the input is silu(gate) * up (up at +K).
    USE_PDL: programmatic dependent launch (kernels/pdl.py)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Clamped row indices: out-of-range W rows re-read row N-1 (no load masks on N);
    # only valid (m, n) are stored.
    n_ld = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n_ld[:, None] * stride_wn
    kb_start = pid_k * blocks_per_split
    kb_end = tl.minimum(kb_start + blocks_per_split, tl.cdiv(K, BLOCK_K))
    pdl_wait(USE_PDL)
    if USE_DOT:
        offs_m = tl.arange(0, BLOCK_M)
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        acc = _dot_tile(x_rows, offs_m[:, None] < M, w_rows, offs_k, kb_start, kb_end, K, K, BLOCK_M, BLOCK_N,
                        BLOCK_K, EVEN_K, UPCAST, PREC, SILU_MUL)
        _store_rows(acc, offs_m, offs_n, M, N, b_ptr, y_ptr, stride_ym, part_ptr, pid_k, PARTIAL, HAS_BIAS)
    else:
        y0, y1 = _fma_rows(x_ptr, x_ptr + stride_xm, w_rows, offs_k, kb_start, kb_end, K, K,
                           BLOCK_N, BLOCK_K, EVEN_K, BLOCK_M == 2, STAGES, SILU_MUL)
        row = tl.arange(0, 1)
        _store_rows(y0[None, :], row, offs_n, M, N, b_ptr, y_ptr, stride_ym, part_ptr, pid_k, PARTIAL, HAS_BIAS)
        if BLOCK_M == 2:
            _store_rows(y1[None, :], row + 1, offs_n, M, N, b_ptr, y_ptr, stride_ym, part_ptr, pid_k,
                        PARTIAL, HAS_BIAS)


@triton.jit
def _splitk_reduce_kernel(part_ptr, b_ptr, y_ptr, M, N, stride_ym,
                          SPLIT: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                          USE_PDL: tl.constexpr):
    """y[m, n] = sum_s part[s, m, n] (+ bias[n]), summed in order s = 0..SPLIT-1."""
    pdl_wait(USE_PDL)
    m = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


_ACTS = (None, "silu_mul")


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None) -> int:
    """Validate the inputs (AssertionError otherwise); returns K, the inner dimension."""
    assert x.dim() == 2 and weight.dim() == 2, f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be 2-D"
    assert act in _ACTS, f"act must be one of {_ACTS}, got {act!r}"
    M, K = x.shape
    if act == "silu_mul":
        assert K % 2 == 0, f"silu_mul takes x [M, 2K] (gate | up), got {tuple(x.shape)}"
        K //= 2
    assert 1 <= M <= MAX_ROWS, f"gemv takes 1..{MAX_ROWS} rows, got {M}"
    assert weight.shape[1] == K, f"x [M, {x.shape[1]}] ({act or 'plain'}) vs weight {tuple(weight.shape)}"
    assert x.dtype in _DTYPES and weight.dtype == x.dtype, f"dtypes x {x.dtype}, weight {weight.dtype}"
    assert x.stride(1) == 1 or x.shape[1] == 1, "x's last dim must be contiguous"
    assert weight.is_contiguous(), "weight must be contiguous [N, K]"
    assert x.device == weight.device
    if bias is not None:
        assert bias.shape == (weight.shape[0],) and bias.dtype == x.dtype and bias.is_contiguous()
        assert bias.device == x.device
    return K


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, config: GemvConfig | None = None,
         act: str | None = None) -> torch.Tensor:
    """``x [M, K] @ weight[N, K]^T (+ bias[N])`` -> ``[M, N]`` in x's dtype (fp32 accumulation).

    ``act="silu_mul"``: x is ``[M, 2K]`` (gate | up) and the product is taken with
    ``silu(gate) * up`` rounded to x's dtype (== ``gemv(silu_and_mul(x), weight)``); the
    config is the one for K. ``config`` overrides :func:`gemv_config` (benchmark sweeps).
    ``out`` ``[M, N]`` (last dim contiguous) receives the result and is returned. Split-K
    configs allocate an fp32 ``[split_k, M, N]`` scratch (size from shapes only: CUDA-graph
    safe). Raises AssertionError on bad shapes, dtypes, layouts or ``act``."""
    K = _check(x, weight, bias, act)
    M = x.shape[0]
    N = weight.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    assert out.shape == (M, N) and out.dtype == x.dtype and (out.stride(1) == 1 or N == 1)
    cfg = config or gemv_config(M, N, K, x.device)
    if cfg.use_dot:
        assert cfg.block_n >= 16 and cfg.block_k >= 16, "tl.dot needs 16x16 tiles"
    else:
        assert M <= 2, "the FMA (use_dot=False) path takes 1 or 2 rows"
    block_m = 16 if cfg.use_dot else M
    k_blocks = triton.cdiv(K, cfg.block_k)
    split = max(1, min(cfg.split_k, k_blocks))
    per_split = triton.cdiv(k_blocks, split)
    split = triton.cdiv(k_blocks, per_split)  # no empty trailing splits
    part = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else out
    has_bias = bias is not None
    b = bias if has_bias else out
    grid = (triton.cdiv(N, cfg.block_n), split)
    pdl = pdl_launch(x.device)
    _gemv_kernel[grid](
        x, weight, b, out, part, M, N, K, x.stride(0), weight.stride(0), out.stride(0), per_split,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=K % cfg.block_k == 0,
        PARTIAL=split > 1, HAS_BIAS=has_bias, USE_DOT=cfg.use_dot, UPCAST=dot_upcast(x.dtype, x.device),
        PREC=dot_precision(x.dtype), STAGES=cfg.num_stages, SILU_MUL=act == "silu_mul",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl)
    if split > 1:
        block = min(1024, next_pow2(N))
        _splitk_reduce_kernel[(triton.cdiv(N, block), M)](
            part, b, out, M, N, out.stride(0), SPLIT=split, BLOCK=block, HAS_BIAS=has_bias,
            num_warps=4, **pdl)
    return out


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: fp32 ``x @ weight^T + bias`` cast to x's dtype ([M, N])."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
