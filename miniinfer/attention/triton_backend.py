"""Triton attention backend: paged KV store + split-KV decode + paged extend kernels.

Per step (token layout: decodes first, then extend/prefill chunks; see forward_context):

1. ``store_kv_cache`` writes the step's k/v into the paged cache at ``meta.slot_mapping``
   (slot -1 is skipped, so padded CUDA-graph batches are fine);
2. the first ``meta.num_decodes`` sequences (one token each) go through
   ``paged_decode_attention`` with ``meta.max_seq_len`` as the split-count bound;
3. the remaining sequences go through ``paged_extend_attention``. Its
   ``query_start_loc`` holds absolute rows of ``q``, so ``meta.query_start_loc[num_decodes:]``
   is passed as is (no re-basing op) together with the full ``q`` / ``out``, and so is the
   full ``meta.tree_mask`` (indexed by absolute row; decode rows ignore it).

``forward_with_rope`` (what the decoder calls on CUDA for models without q/k norms) first
applies NeoX RoPE to q and k in place and writes the rotated k and v to the cache in one kernel
(``kernels/rope_kv_store.py``), replacing step 1; an FP8 cache (or ``fuse_rope = False``,
environment variable ``MINIINFER_FUSED_ROPE_KV=0``) takes ``apply_rope_`` then ``forward``.

Nothing reads device tensors on the host, so a pure-decode step is CUDA-graph capturable
(pass the capture-time upper bound as ``meta.max_seq_len``).

An FP8 cache (``float8_e4m3fn``) takes the kernels' FP8 variants with the backend's
``k_scale``/``v_scale`` (floats, baked into captured graphs: they are fixed at allocation).

Long extend chunks (``q_len >= split_min_query_len``) take the split path of
``attention/prefill_split.py`` (SDPA on the new tokens + the paged prefix kernel, merged)
when ``prefill_attention`` is ``"auto"`` (``set_prefill_attention``, from
``EngineConfig.prefill_attention``, whose default is ``"auto"``: on an H200 in one lease the
split cut a 16k-token TTFT 500 -> 471 ms and raised the long-prompt throughput 3,365 -> 3,475
tok/s (bf16 cache); this class's own default, ``"triton"``, serves direct kernel tests) and the
step allows it: host lists present (never under
CUDA-graph capture or replay), no tree mask, bf16/fp16 on CUDA (with an FP8 cache, the same
key/value numbers as the cache: see ``attention/prefill_split.py``).
"""
from __future__ import annotations

import os

import torch

from miniinfer.attention.graph_buffers import PagedAttentionBase
from miniinfer.attention.metadata import AttentionMetadata
from miniinfer.attention.prefill_split import (PREFILL_ATTENTION_MODES, SPLIT_MIN_QUERY_LEN, SplitPlan,
                                               plan_split, split_extend_attention)
from miniinfer.kernels._common import is_fp8
from miniinfer.kernels.decode_attention import paged_decode_attention
from miniinfer.kernels.extend_attention import paged_extend_attention
from miniinfer.kernels.kv_store import store_kv_cache
from miniinfer.kernels.rope import apply_rope_
from miniinfer.kernels.rope_kv_store import rope_store_kv_cache_


class TritonAttentionBackend(PagedAttentionBase):
    name = "triton"
    prefill_attention: str = "triton"  # auto: split long extend chunks; triton: the paged kernel only
    split_min_query_len: int = SPLIT_MIN_QUERY_LEN
    # forward_with_rope: RoPE + KV store in one kernel; False (MINIINFER_FUSED_ROPE_KV=0): two, for A/B
    fuse_rope: bool = os.environ.get("MINIINFER_FUSED_ROPE_KV", "1") != "0"

    def set_prefill_attention(self, mode: str) -> None:
        """Raises ``ValueError`` for a mode outside ``PREFILL_ATTENTION_MODES``."""
        if mode not in PREFILL_ATTENTION_MODES:
            raise ValueError(f"prefill_attention must be one of {', '.join(PREFILL_ATTENTION_MODES)}, "
                             f"got {mode!r}")
        self.prefill_attention = mode

    def _split_plan(self, q: torch.Tensor, meta: AttentionMetadata, first: int) -> SplitPlan | None:
        """The split routing of extend sequences ``first ..`` (host-only checks, one plan per
        step), or None for the plain kernel."""
        if (self.prefill_attention != "auto" or meta.max_query_len < self.split_min_query_len
                or meta.tree_mask is not None or meta.query_start_loc_cpu is None or meta.seq_lens_cpu is None):
            return None
        if q.is_cuda and (q.dtype == torch.float32 or torch.cuda.is_current_stream_capturing()):
            return None
        plan = meta.step_cached(f"prefill_split:{first}:{self.split_min_query_len}",
                                lambda: plan_split(meta, first, self.split_min_query_len))
        return plan if plan.long else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        return self._attend(q, k, v, k_cache, v_cache, meta, scale)

    def forward_with_rope(self, positions: torch.Tensor, cos_sin_cache: torch.Tensor, rot_dim: int,
                          q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """``forward`` on q ``[T, H, D]`` and k ``[T, Hkv, D]`` after NeoX RoPE at ``positions``
        (int ``[T]``; ``cos_sin_cache`` fp32 ``[max_pos, >= rot_dim]``, as ``kernels/rope.py``),
        applied in place to q and k as ``apply_rope_`` does. The rotation and the KV-cache store
        are one kernel unless the cache is FP8 or ``fuse_rope`` is off. Returns ``[T, H, D]``."""
        if is_fp8(k_cache.dtype) or not self.fuse_rope:
            apply_rope_(positions, q, k, cos_sin_cache, rot_dim)
            return self.forward(q, k, v, k_cache, v_cache, meta, scale)
        rope_store_kv_cache_(positions, q, k, v, cos_sin_cache, rot_dim, k_cache, v_cache, meta.slot_mapping)
        return self._attend(q, k, v, k_cache, v_cache, meta, scale)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention of q ``[T, H, D]`` over the cache, the step's K/V already stored in it
        (k, v ``[T, Hkv, D]`` are read only by the split prefill path)."""
        T, H, D = q.shape
        ks, vs = self.k_scale, self.v_scale
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
        num_seqs = meta.num_seqs
        nd = meta.num_decodes
        if meta.num_decode_tokens != nd:
            nd = 0  # multi-token "decodes" (speculative): the extend kernel handles them
        nd_tok = nd
        if nd > 0:
            paged_decode_attention(
                q[:nd_tok], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                out=out[:nd_tok], max_seq_len=meta.max_seq_len, k_scale=ks, v_scale=vs,
            )
        plan = self._split_plan(q, meta, nd) if num_seqs > nd else None
        if plan is not None:
            split_extend_attention(q, k, v, k_cache, v_cache, meta, plan, scale, out, ks, vs)
        elif num_seqs > nd:
            paged_extend_attention(
                q, k_cache, v_cache, meta.block_tables[nd:], meta.query_start_loc[nd:],
                meta.seq_lens[nd:], meta.max_query_len, scale, out=out, tree_mask=meta.tree_mask,
                k_scale=ks, v_scale=vs,
            )
        return out
