"""Torch-native attention over the paged KV cache: correct everywhere, used on CPU.

Decodes are batched into one SDPA call over K/V gathered through the block tables
(padded to the longest sequence and masked); each prefill / extend chunk runs its own
causal SDPA against its gathered prefix plus its new tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from miniinfer.attention import register_backend
from miniinfer.engine.forward_context import AttentionMetadata


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence: [length, Hkv, D]."""
    block_size = cache.shape[1]
    nblocks = (length + block_size - 1) // block_size
    return cache[block_table[:nblocks]].flatten(0, 1)[:length]


@register_backend("torch")
class TorchAttentionBackend:
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        # CPU SDPA is several times slower in bf16/fp16 than in fp32 (no fused low-precision
        # kernel): attend in fp32 there (gathered K/V are copies anyway).
        if q.device.type == "cpu" and q.dtype != torch.float32:
            out = torch.empty_like(q)
            out.copy_(self._attend(q.float(), k_cache, v_cache, meta, scale, torch.float32))
            return out
        return self._attend(q, k_cache, v_cache, meta, scale, None)

    def _attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, upcast):
        out = torch.empty_like(q)
        group = q.shape[1] // k_cache.shape[2]
        qsl = meta.query_start_loc_cpu
        lens = meta.seq_lens_cpu
        if qsl is None or lens is None:
            qsl, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()

        nd = meta.num_decodes
        if meta.num_decode_tokens != nd:
            nd = 0  # multi-token "decodes" (speculative verify): the extend path handles them
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta.block_tables[:nd], lens[:nd], scale, group,
                                    upcast)
        for i in range(nd, len(lens)):
            s, e, L = qsl[i], qsl[i + 1], lens[i]
            kk = _gather(k_cache, meta.block_tables[i], L)
            vv = _gather(v_cache, meta.block_tables[i], L)
            if upcast is not None:
                kk, vv = kk.to(upcast), vv.to(upcast)
            out[s:e] = self._extend(q[s:e], kk, vv, scale, group)
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, block_tables, lens: list[int], scale, group, upcast=None):
        max_len = max(lens)
        block_size = k_cache.shape[1]
        nblocks = (max_len + block_size - 1) // block_size
        kk = k_cache[block_tables[:, :nblocks]].flatten(1, 2)[:, :max_len]  # [B, L, Hkv, D]
        vv = v_cache[block_tables[:, :nblocks]].flatten(1, 2)[:, :max_len]
        if upcast is not None:
            kk, vv = kk.to(upcast), vv.to(upcast)
        lens_t = torch.tensor(lens, device=q.device)
        mask = torch.arange(max_len, device=q.device)[None, :] < lens_t[:, None]  # [B, L]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), kk.transpose(1, 2), vv.transpose(1, 2),
            attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=group > 1)
        return o.squeeze(2)

    @staticmethod
    def _extend(q, kk, vv, scale, group):
        n, L = q.shape[0], kk.shape[0]
        qt, kt, vt = q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1)
        if n == L:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=group > 1)
        else:
            # query i sits at position L - n + i and sees keys 0 .. L - n + i
            pos_q = torch.arange(L - n, L, device=q.device)[:, None]
            mask = torch.arange(L, device=q.device)[None, :] <= pos_q
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        return o.transpose(0, 1)
