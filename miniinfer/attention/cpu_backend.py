"""The CPU backend: the torch path, with the KV store and the attention of small steps done in C
straight over the paged fp32 cache (``kernels/cpu_kernels.c``) instead of gathering K/V and
calling SDPA. ``auto`` picks it on CPU when the kernels build there.

Every new token is one row of ``paged_decode_attention``: a decode is a sequence's last
token; a prefill / extend chunk of n tokens becomes n rows over the same block table whose
lengths grow by one (token i sees ``L - n + i + 1`` keys: the causal mask). Chunks with more
than ``MAX_EXTEND_PAIRS`` query-key pairs stay on torch SDPA (the C rows don't share K/V
reads across queries, which only pays for short chunks).

With a tree mask (``AttentionMetadata.tree_mask``), a tree row sees its sequence's whole KV
length and the C kernel masks the last 64 keys by the row's bits; rows of -1 stay causal.
"""
from __future__ import annotations

import torch

from miniinfer.attention.torch_backend import TorchAttentionBackend
from miniinfer.attention.metadata import AttentionMetadata
from miniinfer.kernels import cpu_kernels

MAX_EXTEND_PAIRS = 1 << 16


def token_rows(meta: AttentionMetadata, qsl: list[int], lens: list[int]):
    """Per new token: (its sequence's block table [T, max_blocks] int32, the keys it sees [T]
    int32, the most keys, its tree bits [T] int64 or None where the step has no tree row);
    None if a chunk is big."""
    def build():
        seq_of_token: list[int] = []
        seen: list[int] = []
        for i, L in enumerate(lens):
            n = qsl[i + 1] - qsl[i]
            if n > 1 and n * L > MAX_EXTEND_PAIRS:
                return None
            seq_of_token += [i] * n
            seen += range(L - n + 1, L + 1)
        bits = meta.tree_rows()
        if bits is not None and any(x != -1 for x in bits[:len(seen)]):
            seen = [lens[i] if x != -1 else s for i, x, s in zip(seq_of_token, bits, seen)]  # tree rows: all L
            bits = torch.tensor(bits[:len(seen)], dtype=torch.int64)
        else:
            bits = None
        return (meta.block_tables[torch.tensor(seq_of_token)], torch.tensor(seen, dtype=torch.int32), max(lens),
                bits)
    return meta.step_cached("cpu_rows", build)


def _c_attention_fits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """fp32 CPU query and contiguous fp32 caches, head_dim a multiple of 16 up to 128."""
    f32 = torch.float32
    return (q.is_cpu and q.dtype == f32 and k_cache.dtype == f32 and v_cache.dtype == f32
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and q.shape[-1] % 16 == 0 and q.shape[-1] <= 128)


class CPUAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        rows = all(t.dtype == torch.float32 and t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]
                   for t in (k, v))  # fp32 [Hkv, D] blocks, any row stride
        if not (rows and _c_attention_fits(q, k_cache, v_cache)):
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        cpu_kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        if qsl is None or lens is None:
            qsl, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
        rows = token_rows(meta, qsl, lens) if lens else None
        if rows is None or rows[0].shape[0] != q.shape[0]:
            # a long prefill chunk (torch SDPA; decodes still in C, below), or padded rows
            # beyond the last sequence (graph-style buckets), which the torch path leaves alone
            return self._attend(q, k_cache, v_cache, meta, scale, torch.float32)
        tables, seen, max_len, bits = rows
        return cpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, seen, max_len, scale, bits)

    def _decode_batch(self, q, k_cache, v_cache, meta: AttentionMetadata, lens: list[int], scale, group, work):
        if not _c_attention_fits(q, k_cache, v_cache):
            return super()._decode_batch(q, k_cache, v_cache, meta, lens, scale, group, work)
        nd = q.shape[0]
        return cpu_kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], max(lens[:nd]), scale)
