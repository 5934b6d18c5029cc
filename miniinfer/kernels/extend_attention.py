"""Paged extend / prefill attention (FlashAttention-style, causal, GQA).

Layout::

    q               [T, H, D]     queries of all extend sequences (token/head strides free,
                                  last dim contiguous)
    k/v_cache       [num_blocks, block_size, Hkv, D]  holds the cached prefix AND this
                                  step's new tokens (store them first)
    block_tables    int32 [B, max_blocks]
    query_start_loc int32 [B+1]   sequence b's queries are rows qsl[b] .. qsl[b+1]-1 of q
                                  (absolute row indices: qsl[0] need not be 0)
    seq_lens        int32 [B]     KV length of sequence b including its new tokens
    tree_mask       int64 [T]     optional, indexed by absolute row of q: -1 = causal; else
                                  the row sees keys < L - 64 and, of the last 64, those whose
                                  bit is set (bit 0 = key L - 64; see attention/metadata.py)

Query row ``i`` of sequence ``b`` sits at position ``seq_lens[b] - q_len_b + i`` and attends
to kv positions ``<=`` its own. Grid ``(cdiv(max_query_len, BLOCK_M), H, B)``; each program
walks the prefix every query of its tile can see without a mask, then the diagonal band
with the causal mask. Online softmax in base 2 with fp32 accumulation. Rows of ``out``
outside ``query_start_loc`` ranges are left untouched.

With a tree mask (the ``HAS_TREE`` variant), a query tile holding a tree row moves the split
down to ``min(prefix + m_start, seq_len - 64)`` and masks the rest up to ``seq_len`` per row
(causal rows by position, tree rows by bit); a tile of -1 rows runs the split above.

FP8 cache (``float8_e4m3fn``, the ``FP8`` variant): K/V tiles are converted to fp16 (exact) and
the dots run in fp16 with q (``F16_DOT``; fp32 queries stay fp32); ``k_scale`` is folded into the
qk scale and ``v_scale`` multiplies the normalised output.

Prefix-only (``PREFIX_ONLY``, :func:`paged_prefix_attention`): each query attends to its
sequence's cached prefix ``[0, seq_len - q_len)`` only (no mask), for the split prefill path
(``attention/prefill_split.py``) whose new-token part runs elsewhere. ``WRITE_LSE`` stores the
rows' log-sum-exp (natural log, fp32 ``[H, rows]``); ``MERGE`` folds another partial
``(o, lse)`` over disjoint keys into the result by the LSE merge (``_merge_partial``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from miniinfer.kernels._common import dot_precision, dot_upcast, fp16_dots, is_fp8, next_pow2, pages_f32

_LOG2E = 1.4426950408889634
_LOG2E_C = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _attn_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, n0, lo_mask_end, pos_m, bits, win0, kvh,
               stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, qk_scale,
               offs_n, offs_d, mask_d,
               PAGE: tl.constexpr, CAUSAL: tl.constexpr, TREE: tl.constexpr, UPCAST: tl.constexpr,
               PREC: tl.constexpr, FP8: tl.constexpr):
    offs = n0 + offs_n
    mask_n = offs < lo_mask_end
    page = tl.load(bt_row + offs // PAGE, mask=mask_n, other=0).to(tl.int64)
    within = offs % PAGE
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(kc_ptr + (page * stride_kb + within * stride_ks + kvh * stride_kh)[:, None]
                + offs_d[None, :], mask=mask_nd, other=0.0)
    v = tl.load(vc_ptr + (page * stride_vb + within * stride_vs + kvh * stride_vh)[:, None]
                + offs_d[None, :], mask=mask_nd, other=0.0)
    if FP8:  # e4m3 -> q's dtype (exact; fp16 under F16_DOT); the scales are applied by the caller
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    elif UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if CAUSAL:
        seen = offs[None, :] <= pos_m[:, None]
        if TREE:  # rows with bits: key win0 + i iff bit i (logical test: bit 63 is the sign)
            rel = offs - win0
            shift = tl.minimum(tl.maximum(rel, 0), 63).to(tl.int64)
            hit = ((bits[:, None] >> shift[None, :]) & 1) != 0
            seen = tl.where((bits != -1)[:, None], (rel < 0)[None, :] | hit, seen)
        keep = mask_n[None, :] & seen
    else:
        keep = mask_n[None, :]
    qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_sub = m_new
    if TREE:  # a tree row may see no key of a tile yet: no (-inf) - (-inf)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(qk - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


# The block-table width varies per step, and the metadata pointers are row slices (``[nd:]``,
# after the decodes) whose 16-byte alignment varies with the number of decodes: specializing
# on either would compile fresh variants mid-run, after warmup.
@triton.jit(do_not_specialize=["stride_bt", "lse_row0"],
            do_not_specialize_on_alignment=["bt_ptr", "qsl_ptr", "sl_ptr", "tm_ptr"])
def _extend_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, qsl_ptr, sl_ptr, tm_ptr, out_ptr,
    oin_ptr, lin_ptr, lout_ptr,
    qk_scale, v_scale, lse_row0,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    stride_oit, stride_oih, stride_lih, stride_lit, stride_loh, stride_lot,
    G: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, HAS_TREE: tl.constexpr, FP8: tl.constexpr, F16_DOT: tl.constexpr,
    PREFIX_ONLY: tl.constexpr, MERGE: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    # Heaviest (last, most keys under the causal mask) query tiles are scheduled first.
    mt = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    m_start = mt * BLOCK_M
    if m_start >= q_len:
        return
    seq_len = tl.load(sl_ptr + b)
    prefix = seq_len - q_len
    kvh = h // G

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_md, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if F16_DOT:  # FP8 cache: the dots in fp16 (_common.fp16_dots; |q| clamped to fp16's range)
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    pos_m = prefix + offs_m

    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys every query of this tile sees: positions [0, prefix + m_start) (PREFIX_ONLY: the
    # cached prefix [0, prefix) alone, no band).
    full_end = prefix + m_start
    if PREFIX_ONLY:
        full_end = prefix
    # Diagonal band: positions [prefix + m_start, min(prefix + m_start + BLOCK_M, seq_len)).
    band_end = tl.minimum(full_end + BLOCK_M, seq_len)
    win0 = seq_len - 64
    if HAS_TREE:
        bits = tl.load(tm_ptr + rows, mask=mask_m, other=-1)
        any_tree = tl.max((bits != -1).to(tl.int32), 0) > 0
        # with a tree row: all keys from the window (or the tile's first position) on are masked
        full_end = tl.where(any_tree, tl.maximum(tl.minimum(full_end, win0), 0), full_end)
        band_end = tl.where(any_tree, seq_len, band_end)
    else:
        bits = pos_m.to(tl.int64)  # unused
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, n0, full_end, pos_m, bits, win0,
                                   kvh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                   qk_scale, offs_n, offs_d, mask_d,
                                   PAGE=PAGE, CAUSAL=False, TREE=False, UPCAST=UPCAST, PREC=PREC, FP8=FP8)
    if PREFIX_ONLY:
        band_end = full_end
    for n0 in range(full_end, band_end, BLOCK_N):
        acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, n0, band_end, pos_m, bits, win0,
                                   kvh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                   qk_scale, offs_n, offs_d, mask_d,
                                   PAGE=PAGE, CAUSAL=True, TREE=HAS_TREE, UPCAST=UPCAST, PREC=PREC, FP8=FP8)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if FP8:
        o = o * v_scale
    lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))  # base 2 (scaled scores); -inf: no key
    lrows = rows - lse_row0
    if MERGE:
        o, lse = _merge_partial(o, lse, oin_ptr, lin_ptr, lrows, h, offs_d, mask_m, mask_md,
                                stride_oit, stride_oih, stride_lih, stride_lit)
    if WRITE_LSE:  # natural log, as torch's SDPA ops return it
        tl.store(lout_ptr + h * stride_loh + lrows * stride_lot, lse * _LN2, mask=mask_m)
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask_md)


@triton.jit
def _merge_partial(o, lse, oin_ptr, lin_ptr, lrows, h, offs_d, mask_m, mask_md,
                   stride_oit, stride_oih, stride_lih, stride_lit):
    """Merge this tile's normalised partial ``(o, lse)`` (lse base 2) with another partial over
    disjoint keys: ``o_in`` rows and its natural-log LSE at ``lrows``. The LSE merge of
    FlashInfer's ``merge_state`` (docs: "Cascade Inference", attention states) / vLLM's
    ``merge_attn_states``: weights ``exp(lse_i - max)``, output their normalised mix."""
    o_in = tl.load(oin_ptr + lrows[:, None] * stride_oit + h * stride_oih + offs_d[None, :],
                   mask=mask_md, other=0.0).to(tl.float32)
    lse_in = tl.load(lin_ptr + h * stride_lih + lrows * stride_lit, mask=mask_m, other=0.0) * _LOG2E_C
    m = tl.maximum(lse, lse_in)
    m = tl.where(m == float("-inf"), 0.0, m)  # both empty: weights 0, output 0 (never in use)
    w_a = tl.exp2(lse - m)
    w_b = tl.exp2(lse_in - m)
    w = w_a + w_b
    w_safe = tl.where(w > 0.0, w, 1.0)
    o = (o * w_a[:, None] + o_in * w_b[:, None]) / w_safe[:, None]
    return o, m + tl.log2(w)


def _default_blocks(head_dim: int, max_query_len: int, dtype: torch.dtype,
                    plain: bool = True) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages). ``plain``: no tree mask, no FP8 cache."""
    # fp32 (exactness tests only) doubles the shared-memory tiles: use smaller query tiles.
    block_m = 128 if (head_dim <= 128 and dtype != torch.float32) else 64
    block_m = min(block_m, max(16, next_pow2(max_query_len)))
    if plain and block_m == 128 and head_dim <= 128 and max_query_len >= 1024:
        # long chunks: 128-key tiles, 3 stages (H200 sweep, benchmarks/prefill_attn_bench.py,
        # 2026-11-30: 8192 queries over 8192 cached keys 4.94 -> 4.56 ms on Qwen2-7B heads,
        # 2.93 -> 2.67 ms on Qwen3-0.6B's; the best config at 2k-8k queries on both)
        return 128, 128, 8, 3
    block_n = 64 if head_dim <= 128 else 32
    num_warps = 8 if (block_m >= 128 and head_dim >= 128) else 4
    return block_m, block_n, num_warps, 2


def _check_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                query_start_loc: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Shape/stride checks shared by the wrappers (AssertionError); returns ``out`` (allocated if None)."""
    T, H, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape, (q.shape, k_cache.shape, v_cache.shape)
    assert H % Hkv == 0, f"num_heads {H} must be a multiple of num_kv_heads {Hkv}"
    assert page & (page - 1) == 0, "block_size must be a power of two"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    B = seq_lens.shape[0]
    assert query_start_loc.shape[0] >= B + 1 and block_tables.shape[0] >= B
    assert block_tables.stride(1) == 1
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    assert out.shape == (T, H, D) and out.stride(2) == 1
    return out


def _launch(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len: int, scale: float,
            out, tree_mask, k_scale: float, v_scale: float, tiles: tuple[int | None, ...], *,
            prefix_only: bool = False, merge_with: tuple[torch.Tensor, torch.Tensor] | None = None,
            lse_out: torch.Tensor | None = None, lse_row0: int = 0) -> None:
    """One ``_extend_kernel`` launch; ``tiles`` = (block_m, block_n, num_warps, num_stages), None: default."""
    T, H, D = q.shape
    B = seq_lens.shape[0]
    fp8 = is_fp8(k_cache.dtype)
    bm, bn, nw, ns = _default_blocks(D, max_query_len, q.dtype, plain=tree_mask is None and not fp8)
    block_m, block_n, num_warps, num_stages = tiles
    block_m, block_n, num_warps, num_stages = block_m or bm, block_n or bn, num_warps or nw, num_stages or ns
    grid = (triton.cdiv(max_query_len, block_m), H, B)
    qk_scale = scale * _LOG2E * k_scale if fp8 else scale * _LOG2E
    o_in, lse_in = merge_with if merge_with is not None else (out, out[0])  # unread dummies without MERGE
    lse_w = lse_out if lse_out is not None else lse_in
    _extend_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
        tree_mask if tree_mask is not None else seq_lens, out, o_in, lse_in, lse_w,
        qk_scale, v_scale, lse_row0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        o_in.stride(0), o_in.stride(1), lse_in.stride(0), lse_in.stride(1), lse_w.stride(0), lse_w.stride(1),
        G=H // k_cache.shape[2], PAGE=k_cache.shape[1], D=D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_pow2(D),
        UPCAST=dot_upcast(q.dtype, q.device), PREC=dot_precision(q.dtype), HAS_TREE=tree_mask is not None,
        FP8=fp8, F16_DOT=fp16_dots(k_cache.dtype, q.dtype), PREFIX_ONLY=prefix_only,
        MERGE=merge_with is not None, WRITE_LSE=lse_out is not None,
        num_warps=num_warps, num_stages=num_stages,
    )


def paged_extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                           seq_lens: torch.Tensor, max_query_len: int, scale: float,
                           out: torch.Tensor | None = None,
                           block_m: int | None = None, block_n: int | None = None,
                           tree_mask: torch.Tensor | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0,
                           num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged KV; with
    ``tree_mask`` (int64, one value per row of q, indexed by absolute row), tree rows by
    their window bits (module docstring).

    Returns ``out [T, H, D]`` (allocated if not given). ``max_query_len`` is a host-side
    upper bound on ``qsl[b+1] - qsl[b]`` (query tiles beyond a sequence's length exit at
    once). ``block_m``/``block_n``/``num_warps``/``num_stages`` override the launch config
    (tests, benchmarks; None: ``_default_blocks``). ``k_scale``/``v_scale``:
    an FP8 cache's per-tensor scales (value = fp8 * scale); ignored for other cache dtypes.
    """
    out = _check_args(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out)
    if tree_mask is not None:
        assert tree_mask.dtype == torch.int64 and tree_mask.shape[0] >= q.shape[0] and tree_mask.stride(0) == 1
    if seq_lens.shape[0] == 0 or q.shape[0] == 0 or max_query_len <= 0:
        return out
    _launch(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len, scale, out,
            tree_mask, k_scale, v_scale, (block_m, block_n, num_warps, num_stages))
    return out


def paged_prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                           seq_lens: torch.Tensor, max_query_len: int, scale: float,
                           out: torch.Tensor | None = None, lse_out: torch.Tensor | None = None,
                           merge_with: tuple[torch.Tensor, torch.Tensor] | None = None, lse_row0: int = 0,
                           block_m: int | None = None, block_n: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Attention of each sequence's new tokens over its cached prefix only (KV positions
    ``[0, seq_len - q_len)``, no mask: every query sees the whole prefix), the ``PREFIX_ONLY``
    variant of the extend kernel. Arguments as in :func:`paged_extend_attention` (no tree
    mask).

    ``lse_out`` (fp32 ``[H, >= rows]``, any strides): receives the natural-log log-sum-exp of
    the scaled scores of each written row (absolute row of q) at column ``row - lse_row0``
    (``-inf`` for an empty prefix; with ``merge_with``, the merged LSE). ``merge_with = (o_in
    [>= rows, H, D], lse_in [H, >= rows] fp32 natural log)``, both at ``row - lse_row0``: a
    partial over other keys (the new tokens, e.g. from SDPA) merged into the result by the LSE
    rule (``_merge_partial``), so ``out`` holds attention over all keys. ``o_in`` may alias
    ``out``'s rows (each program reads its tile before it writes it). Returns ``out``.
    """
    out = _check_args(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out)
    for lse in (lse_out, merge_with[1] if merge_with is not None else None):
        assert lse is None or (lse.dtype == torch.float32 and lse.dim() == 2 and lse.shape[0] == q.shape[1])
    if merge_with is not None:
        assert merge_with[0].shape[1:] == q.shape[1:] and merge_with[0].stride(2) == 1
    if seq_lens.shape[0] == 0 or q.shape[0] == 0 or max_query_len <= 0:
        return out
    _launch(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, max_query_len, scale, out,
            None, k_scale, v_scale, (block_m, block_n, num_warps, num_stages), prefix_only=True,
            merge_with=merge_with, lse_out=lse_out, lse_row0=lse_row0)
    return out


def paged_extend_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float,
                               tree_mask: torch.Tensor | None = None,
                               k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Per-sequence torch reference (fp32 math, host loop). Rows outside the query ranges
    are zero. ``tree_mask`` as in :func:`paged_extend_attention`; an FP8 cache is dequantized
    (``fp8 * scale``) before the math."""
    T, H, D = q.shape
    page, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    out = torch.zeros_like(q)
    qsl = [int(x) for x in query_start_loc.tolist()]
    for b in range(seq_lens.shape[0]):
        L = int(seq_lens[b])
        s, e = qsl[b], qsl[b + 1]
        n = e - s
        if n == 0:
            continue
        pages = block_tables[b, : math.ceil(L / page)].long()
        k = pages_f32(k_cache, pages, k_scale)[:L].repeat_interleave(G, dim=1)
        v = pages_f32(v_cache, pages, v_scale)[:L].repeat_interleave(G, dim=1)
        scores = torch.einsum("qhd,lhd->hql", q[s:e].float(), k) * scale  # [H, n, L]
        qpos = torch.arange(L - n, L, device=q.device)[:, None]
        kpos = torch.arange(L, device=q.device)[None, :]
        hidden = kpos > qpos
        if tree_mask is not None:
            bits = tree_mask[s:e].cpu().long()[:, None]
            rel = torch.arange(L)[None, :] - (L - 64)
            tree_seen = (rel < 0) | (((bits >> rel.clamp(0, 63)) & 1) != 0)
            hidden = torch.where(bits != -1, ~tree_seen, hidden.cpu()).to(q.device)
        scores = scores.masked_fill(hidden, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[s:e] = torch.einsum("hql,lhd->qhd", probs, v).to(q.dtype)
    return out
