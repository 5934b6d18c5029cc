"""The CPU backend: the torch path, with decodes attended by a C kernel straight over the
paged fp32 cache (``kernels/cpu_kernels.c``) instead of gathering K/V and calling SDPA.
``auto`` picks it on CPU when the kernels build there; prefill/extend chunks stay torch."""
from __future__ import annotations

import torch

from miniinfer.attention import register_backend
from miniinfer.attention.torch_backend import TorchAttentionBackend
from miniinfer.engine.forward_context import AttentionMetadata
from miniinfer.kernels import cpu_kernels


@register_backend("cpu")
class CPUAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        f32 = torch.float32
        fp32 = (q.is_cpu and k_cache.is_cpu and q.dtype == f32 and k.dtype == f32 and v.dtype == f32
                and k_cache.dtype == f32 and v_cache.dtype == f32)
        rows = all(t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] for t in (k, v))  # [Hkv, D] blocks
        if not (fp32 and rows and k_cache.is_contiguous() and v_cache.is_contiguous()):
            return super().forward(q, k, v, k_cache, v_cache, meta, scale)
        cpu_kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self._attend(q, k_cache, v_cache, meta, scale, torch.float32)

    def _decode_batch(self, q, k_cache, v_cache, meta: AttentionMetadata, lens: list[int], scale, group, work):
        if (q.device.type != "cpu" or k_cache.dtype != torch.float32 or not k_cache.is_contiguous()
                or not v_cache.is_contiguous() or q.shape[-1] % 16 or q.shape[-1] > 128):
            return super()._decode_batch(q, k_cache, v_cache, meta, lens, scale, group, work)
        nd = q.shape[0]
        return cpu_kernels.paged_decode_attention(
            q.float(), k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], max(lens[:nd]), scale)
