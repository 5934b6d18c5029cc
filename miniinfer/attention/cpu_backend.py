"""The CPU backend: the torch path, with the KV store and the attention of small steps done in C
straight over the paged fp32 cache (``kernels/cpu_kernels.c``) instead of gathering K/V and
calling SDPA. ``auto`` picks it on CPU when the kernels build there.

Every new token is one row of ``paged_decode_attention``: a decode is a sequence's last
token; a prefill / extend chunk of n tokens becomes n rows over the same block table whose
lengths grow by one (token i sees ``L - n + i + 1`` keys: the causal mask). Chunks with more
than ``MAX_EXTEND_PAIRS`` query-key pairs stay on torch SDPA (the C rows don't share K/V
reads across queries, which only pays for short chunks).
"""
from __future__ import annotations

import torch

from miniinfer.attention import register_backend
from miniinfer.attention.torch_backend import TorchAttentionBackend
from miniinfer.engine.forward_context import AttentionMetadata
from miniinfer.kernels import cpu_kernels

MAX_EXTEND_PAIRS = 1 << 16


def _token_rows(meta: AttentionMetadata, qsl: list[int], lens: list[int]):
    """Per new token: its sequence's block table and the keys it sees; None if a chunk is big."""
    rows = meta.per_step.get("cpu_rows") if meta.seq_lens_cpu is not None else None
    if rows is not None:
        return rows
    seq_of_token: list[int] = []
    seen: list[int] = []
    for i, L in enumerate(lens):
        n = qsl[i + 1] - qsl[i]
        if n > 1 and n * L > MAX_EXTEND_PAIRS:
            return None
        seq_of_token += [i] * n
        seen += range(L - n + 1, L + 1)
    rows = (meta.block_tables[torch.tensor(seq_of_token)], torch.tensor(seen, dtype=torch.int32), max(lens))
    if meta.seq_lens_cpu is not None:
        meta.per_step["cpu_rows"] = rows
    return rows


@register_backend("cpu")
class CPUAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        f32 = torch.float32
        fp32 = (q.is_cpu and k_cache.is_cpu and q.dtype == f32 and k.dtype == f32 and v.dtype == f32
                and k_cache.dtype == f32 and v_cache.dtype == f32)
        rows = all(t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] for t in (k, v))  # [Hkv, D] blocks
        if not (fp32 and rows and k_cache.is_contiguous() and v_cache.is_contiguous()
                and q.shape[-1] % 16 == 0 and q.shape[-1] <= 128):
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        cpu_kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        if qsl is None or lens is None:
            qsl, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
        token_rows = _token_rows(meta, qsl, lens) if lens else None
        if token_rows is None or token_rows[0].shape[0] != q.shape[0]:
            # a long prefill chunk (torch SDPA; decodes still in C, below), or padded rows
            # beyond the last sequence (graph-style buckets), which the torch path leaves alone
            return self._attend(q, k_cache, v_cache, meta, scale, f32)
        tables, seen, max_len = token_rows
        return cpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, seen, max_len, scale)

    def _decode_batch(self, q, k_cache, v_cache, meta: AttentionMetadata, lens: list[int], scale, group, work):
        if (q.device.type != "cpu" or k_cache.dtype != torch.float32 or not k_cache.is_contiguous()
                or not v_cache.is_contiguous() or q.shape[-1] % 16 or q.shape[-1] > 128):
            return super()._decode_batch(q, k_cache, v_cache, meta, lens, scale, group, work)
        nd = q.shape[0]
        return cpu_kernels.paged_decode_attention(
            q.float(), k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], max(lens[:nd]), scale)
