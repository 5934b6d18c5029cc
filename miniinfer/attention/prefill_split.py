"""Split prefill attention: long extend chunks through torch SDPA (cuDNN / FlashAttention).

A long chunk's attention is two partials over disjoint keys, merged by their log-sum-exps:

* the new tokens over themselves, causal (``q_len == kv_len``, so top-left and bottom-right
  causal alignment agree): torch's fused SDPA ops on the step's contiguous ``k``/``v`` (not
  the cache), ``[1, H, n, D]`` views of the ``[T, H, D]`` rows;
* the same queries over the sequence's cached prefix (positions ``[0, seq_len - n)``, no
  mask): the paged Triton kernel's ``PREFIX_ONLY`` variant, whose epilogue merges the SDPA
  partial in (``kernels/extend_attention.py``, ``_merge_partial``).

The merge is the standard attention-state merge: for partials ``(o_i, lse_i)``,
``m = max(lse_1, lse_2)``, ``o = sum_i o_i exp(lse_i - m) / sum_i exp(lse_i - m)``,
``lse = m + log(sum_i exp(lse_i - m))`` (FlashInfer, "Cascade Inference" and its
``merge_state`` operator; vLLM's ``merge_attn_states``). :func:`merge_attn_states` is the torch
version (tests, fallback).

Which sequences are long is host knowledge (``AttentionMetadata.query_start_loc_cpu`` /
``seq_lens_cpu``); metadata without those lists (CUDA-graph capture and replay) never takes
this path, nor does a step under stream capture or with a tree mask (the backend checks).
With an FP8 cache the prefix is read with its scales and the new tokens' k/v are rounded
through e4m3 first (quantize + dequantize, as the cache stores them), so a chunk sees the same
key/value numbers whichever path it takes, and later decode steps see them too. Other extend
sequences of the step go through the plain paged kernel in contiguous runs (the kernel takes
absolute query rows, so slices of the metadata suffice).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from miniinfer.attention.metadata import AttentionMetadata

PREFILL_ATTENTION_MODES = ("auto", "triton")  # auto: split long chunks (CUDA, bf16/fp16); triton: never
SPLIT_MIN_QUERY_LEN = 1024  # new tokens of a sequence for the split path
# SDPA ops tried in order for the new-token partial; an op that raises (unavailable, layout or
# GQA refused) is retried with repeated k/v heads, then dropped for the process. cuDNN first:
# on an H200 (benchmarks/prefill_attn_bench.py, 2026-11-30) its causal attention over 8192 new
# tokens ran at 581 TFLOP/s (Qwen2-7B heads, GQA) against 310 for FlashAttention-2 and 265 for
# our Triton kernel. But torch builds (and caches) a cuDNN execution graph per new shape, 40-70
# ms each, so chunk lengths are padded up to a multiple of SDPA_BUCKET (zero rows after the
# real ones: with q_len == kv_len the causal mask keeps them out of every real row) and
# ``warmup_split`` builds every bucket's graph at start-up.
SDPA_ORDER = ("cudnn", "flash")
SDPA_BUCKET = 512


@dataclass(frozen=True)
class SplitPlan:
    """Routing of a step's extend sequences (indices into the metadata's sequences).

    ``long``: ``(b, row_start, row_end, prefix)`` per split sequence (rows of q, cached keys);
    ``runs``: ``(b0, b1, max_query_len)`` contiguous runs of the other extend sequences."""

    long: tuple[tuple[int, int, int, int], ...]
    runs: tuple[tuple[int, int, int], ...]


def plan_split(meta: AttentionMetadata, first: int, min_query_len: int = SPLIT_MIN_QUERY_LEN) -> SplitPlan:
    """The plan of sequences ``first ..`` of ``meta`` (host lists required: ``ValueError``
    without them). Sequences with ``q_len >= min_query_len`` are split; an empty ``long``
    means the plain kernel serves the step."""
    qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    if qsl is None or lens is None:
        raise ValueError("plan_split needs the metadata's host lists (query_start_loc_cpu, seq_lens_cpu)")
    long: list[tuple[int, int, int, int]] = []
    runs: list[tuple[int, int, int]] = []
    run_start, run_max = -1, 0
    for b in range(first, len(lens)):
        n = qsl[b + 1] - qsl[b]
        if n >= min_query_len:
            long.append((b, qsl[b], qsl[b + 1], lens[b] - n))
            if run_start >= 0:
                runs.append((run_start, b, run_max))
            run_start, run_max = -1, 0
        else:
            run_start = b if run_start < 0 else run_start
            run_max = max(run_max, n)
    if run_start >= 0:
        runs.append((run_start, len(lens), run_max))
    return SplitPlan(tuple(long), tuple(runs))


def merge_attn_states(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
                      lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention partials over disjoint keys (torch ops; module docstring).

    ``o1``/``o2`` ``[n, H, D]`` (any float dtype), ``lse1``/``lse2`` ``[H, n]`` natural-log
    log-sum-exps of the scaled scores (``-inf``: the partial saw no key). Returns ``(o [n, H, D]``
    in ``o1``'s dtype, ``lse [H, n]`` fp32). Rows where both are empty come out 0 / ``-inf``."""
    l1, l2 = lse1.float().t(), lse2.float().t()  # [n, H]
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    w = w1 + w2
    o = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / w.clamp_min(1e-30)[..., None]
    return o.to(o1.dtype), (m + torch.log(w)).t()


_bad_ops: set[tuple[str, bool]] = set()  # (op, repeat_kv) combinations that raised


def _run_op(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            want_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if op == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, want_lse, 0.0, True, False,
                                                               scale=scale)
    elif op == "flash":
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    else:  # "cpu": the CPU flash kernel (tests); its LSE is [1, n, H] transposed
        r = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    lse = r[1].reshape(q.shape[1], q.shape[2]) if want_lse else None  # [H, n] (cuDNN: [1, H, n, 1])
    return r[0], lse


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                want_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal self-attention of one sequence's new tokens through torch's fused SDPA ops.

    ``q [1, H, n, D]``, ``k``/``v`` ``[1, Hkv, n, D]`` (bf16/fp16 on CUDA; any strides with a
    contiguous last dim). Returns ``(o [1, H, n, D]`` in q's dtype, ``lse [H, n]`` fp32 natural
    log or None unless ``want_lse``). Ops follow ``SDPA_ORDER`` on CUDA (``"cpu"`` elsewhere),
    GQA passed through first, then with repeated k/v heads. Raises ``RuntimeError`` if none runs."""
    ops = SDPA_ORDER if q.is_cuda else ("cpu",)
    errors: list[str] = []
    for op in ops:
        for repeat in (False, True):
            if (op, repeat) in _bad_ops or (repeat and k.shape[1] == q.shape[1]):
                continue
            kk, vv = k, v
            if repeat:
                g = q.shape[1] // k.shape[1]
                kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            try:
                o, lse = _run_op(op, q, kk, vv, scale, want_lse)
            except torch.cuda.OutOfMemoryError:
                raise  # not the op's fault: keep it for later steps
            except (RuntimeError, NotImplementedError) as exc:  # host-side checks: nothing launched
                _bad_ops.add((op, repeat))
                errors.append(f"{op}{' (repeat_kv)' if repeat else ''}: {exc}")
                continue
            if lse is not None and lse.dtype != torch.float32:
                lse = lse.float()
            return o, lse
    raise RuntimeError("no SDPA op ran for the split prefill path: " + " | ".join(errors))


def _bucket(n: int) -> int:
    return -(-n // SDPA_BUCKET) * SDPA_BUCKET


def _padded_heads_first(rows: torch.Tensor, n_pad: int) -> torch.Tensor:
    """``rows [n, h, D]`` -> ``[1, h, n_pad, D]``: a view when ``n == n_pad`` and the rows are
    contiguous, else a contiguous copy with zero rows appended (only the tail is zeroed: one
    write of the buffer, not two). The strides are then always
    those of a contiguous ``[n_pad, h, D]`` (cuDNN keys its graphs on strides too: q/k/v that
    are views of the fused qkv output would miss the graphs built at warm-up)."""
    n = rows.shape[0]
    if n != n_pad or not rows.is_contiguous():
        padded = rows.new_empty((n_pad,) + tuple(rows.shape[1:]))
        padded[:n] = rows
        padded[n:].zero_()
        rows = padded
    return rows.transpose(0, 1).unsqueeze(0)


def warmup_split(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_tokens: int, scale: float) -> int:
    """Run the new-token SDPA of every bucket up to ``max_tokens`` (with and without the LSE),
    so that cuDNN's per-shape graphs are built before the first request. Returns the count."""
    count = 0
    for n in range(_bucket(SPLIT_MIN_QUERY_LEN), _bucket(max_tokens) + 1, SDPA_BUCKET):
        q = torch.zeros((n, num_heads, head_dim), dtype=dtype, device=device)
        kv = torch.zeros((n, num_kv_heads, head_dim), dtype=dtype, device=device)
        qs, ks = _padded_heads_first(q, n), _padded_heads_first(kv, n)
        for want_lse in (False, True):
            sdpa_causal(qs, ks, ks, scale, want_lse)
            count += 1
    return count


def split_extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, meta: AttentionMetadata, plan: SplitPlan, scale: float,
                           out: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Extend attention of a step by ``plan`` (:func:`plan_split`), written into ``out``.

    ``q [T, H, D]``, ``k``/``v`` ``[T, Hkv, D]`` (this step's new tokens, rows as q's),
    caches ``[num_blocks, block_size, Hkv, D]`` already holding the new tokens (the plain
    kernel of the short runs reads them there), ``out [T, H, D]``. Returns ``out``.
    With an FP8 cache the scales (``k_scale``/``v_scale``) apply to the cached prefix, and the
    new tokens' ``k``/``v`` are rounded through e4m3 with them (the values the cache holds)."""
    # imported here: the planning and merge helpers above stay importable without triton
    from miniinfer.kernels._common import dequantize_fp8, is_fp8, quantize_fp8
    from miniinfer.kernels.extend_attention import paged_extend_attention, paged_prefix_attention

    def as_cached(x: torch.Tensor, scale: float) -> torch.Tensor:
        return dequantize_fp8(quantize_fp8(x, scale), scale, x.dtype) if is_fp8(k_cache.dtype) else x

    for b0, b1, max_q in plan.runs:
        paged_extend_attention(q, k_cache, v_cache, meta.block_tables[b0:b1], meta.query_start_loc[b0:b1 + 1],
                               meta.seq_lens[b0:b1], max_q, scale, out=out, k_scale=k_scale, v_scale=v_scale)
    for b, s, e, prefix in plan.long:
        n = e - s
        qs, ks, vs = (_padded_heads_first(x, _bucket(n))
                      for x in (q[s:e], as_cached(k[s:e], k_scale), as_cached(v[s:e], v_scale)))
        o, lse = sdpa_causal(qs, ks, vs, scale, want_lse=prefix > 0)
        o_rows = o[0].transpose(0, 1)[:n]  # [n, H, D]
        lse = lse[:, :n] if lse is not None else None
        if prefix == 0:
            out[s:e].copy_(o_rows)
            continue
        paged_prefix_attention(q, k_cache, v_cache, meta.block_tables[b:b + 1], meta.query_start_loc[b:b + 2],
                               meta.seq_lens[b:b + 1], e - s, scale, out=out, merge_with=(o_rows, lse),
                               lse_row0=s, k_scale=k_scale, v_scale=v_scale)
    return out
