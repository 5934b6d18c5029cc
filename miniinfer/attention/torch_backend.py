"""Torch-native attention over the paged KV cache: correct everywhere, used on CPU.

Decodes are batched into one SDPA call over K/V gathered through the block tables
(padded to the longest sequence and masked; the gather indices and the mask are built
once per step and shared by all layers); each prefill / extend chunk runs its own causal
SDPA against its gathered prefix plus its new tokens, or, when the step has a tree mask
(``AttentionMetadata.tree_mask``) with tree rows in the chunk, an SDPA under the chunk's
[n, L] mask (``chunk_mask``: causal rows as usual, tree rows by their window bits).

On CPU the math runs in fp32 whatever the model dtype (CPU SDPA is several times slower
in bf16/fp16), and the model runner keeps the CPU cache in fp32 so gathers need no upcast.

An FP8 cache (``float8_e4m3fn``; the engine allows it on CUDA only, this path serves as the
reference on any device) is written as ``x / scale`` saturated to +-448 and read back cast
to the work dtype (exact); ``k_scale`` is folded into the softmax scale and ``v_scale`` into
the output. fp8 has no CPU index kernels, so its rows move as bytes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from miniinfer.attention.graph_buffers import PagedAttentionBase
from miniinfer.attention.metadata import AttentionMetadata, context_slots
from miniinfer.kernels._common import is_fp8, quantize_fp8


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v [T, Hkv, D] into the caches [num_blocks, block_size, Hkv, D] at ``slot_mapping``
    [T] int64 (-1: skipped); an FP8 cache stores ``x / scale`` saturated (scales ignored otherwise)."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    for x, cache, s in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        rows = cache.view(-1, *cache.shape[2:])
        if is_fp8(cache.dtype):
            rows.view(torch.uint8).index_copy_(0, slot_mapping, quantize_fp8(x, s).view(torch.uint8))
        else:
            rows.index_copy_(0, slot_mapping, x.to(cache.dtype))


def _bytes(cache: torch.Tensor) -> torch.Tensor:
    """An FP8 cache's uint8 view (gathers work on it), any other cache as is."""
    return cache.view(torch.uint8) if is_fp8(cache.dtype) else cache


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int, work: torch.dtype) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence: [length, Hkv, D] in ``work`` (unscaled)."""
    block_size = cache.shape[1]
    nblocks = (length + block_size - 1) // block_size
    return _bytes(cache)[block_table[:nblocks]].view(cache.dtype).flatten(0, 1)[:length].to(work)


def _decode_plan(meta: AttentionMetadata, nd: int, lens: list[int], block_size: int, device):
    """Cache slots [nd * L] of every decode sequence's context (padded to the longest, L)
    and the additive mask [nd, 1, 1, L] hiding the padding; built once per step."""
    def build():
        max_len = max(lens[:nd])
        pos = torch.arange(max_len, device=device)
        slots = context_slots(meta.block_tables[:nd], max_len, block_size)  # [nd, L]
        lens_t = torch.tensor(lens[:nd], device=device)
        hidden = pos[None, :] >= lens_t[:, None]
        mask = torch.zeros(nd, max_len, device=device).masked_fill_(hidden, float("-inf"))
        return slots.flatten(), mask[:, None, None, :], max_len
    return meta.step_cached("torch_decode", build)


def chunk_mask(bits: list[int], L: int, device) -> torch.Tensor:
    """[n, L] bool: which of the sequence's L keys each of its n new tokens sees, given their
    tree-mask values ``bits`` (-1: causal, query i sees keys 0 .. L - n + i; otherwise key j
    iff j < L - 64 or bit j - (L - 64) is set)."""
    n = len(bits)
    keys = torch.arange(L, device=device)
    causal = keys[None, :] <= torch.arange(L - n, L, device=device)[:, None]
    b = torch.tensor(bits, dtype=torch.int64, device=device)[:, None]
    rel = keys - (L - 64)
    tree = (rel < 0)[None, :] | (((b >> rel.clamp(0, 63)) & 1) != 0)
    return torch.where(b != -1, tree, causal)


def _tree_masks(meta: AttentionMetadata, qsl: list[int], lens: list[int], first: int, device) -> list:
    """Per sequence from ``first`` on: its ``chunk_mask``, or None where it has no tree row."""
    def build():
        bits = meta.tree_rows()
        return [chunk_mask(bits[qsl[i]:qsl[i + 1]], lens[i], device)
                if any(x != -1 for x in bits[qsl[i]:qsl[i + 1]]) else None
                for i in range(first, len(lens))]
    return meta.step_cached(f"torch_tree_{first}", build)


class TorchAttentionBackend(PagedAttentionBase):
    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        fp8 = is_fp8(k_cache.dtype)
        work = torch.float32 if q.device.type == "cpu" else (q.dtype if fp8 else k_cache.dtype)
        if fp8:  # fp8 * k_scale: in the softmax scale; fp8 * v_scale: on the output
            out = self._attend(q.to(work), k_cache, v_cache, meta, scale * self.k_scale, work)
            return out.mul_(self.v_scale).to(q.dtype)
        if q.dtype != work:
            return self._attend(q.to(work), k_cache, v_cache, meta, scale, work).to(q.dtype)
        return self._attend(q, k_cache, v_cache, meta, scale, work)

    def _attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, work: torch.dtype):
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
            out[:nd] = self._decode_batch(q[:nd], k_cache, v_cache, meta, lens, scale, group, work)
        masks = _tree_masks(meta, qsl, lens, nd, q.device) if meta.tree_mask is not None else None
        for i in range(nd, len(lens)):
            s, e, L = qsl[i], qsl[i + 1], lens[i]
            kk = _gather(k_cache, meta.block_tables[i], L, work)
            vv = _gather(v_cache, meta.block_tables[i], L, work)
            out[s:e] = self._extend(q[s:e], kk, vv, scale, group, masks[i - nd] if masks else None)
        return out

    def _decode_batch(self, q, k_cache, v_cache, meta: AttentionMetadata, lens: list[int], scale, group, work):
        """The first ``len(q)`` sequences, one new token each."""
        slots, mask, max_len = _decode_plan(meta, q.shape[0], lens, k_cache.shape[1], q.device)
        return self._decode(q, k_cache, v_cache, slots, mask, max_len, scale, group, work)

    @staticmethod
    def _decode(q, k_cache, v_cache, slots, mask, max_len: int, scale, group, work):
        b, hkv, d = q.shape[0], k_cache.shape[2], k_cache.shape[3]
        # index_select on [slots, Hkv * D] rows: one contiguous copy per token
        kk = _bytes(k_cache).view(-1, hkv * d).index_select(0, slots).view(k_cache.dtype)
        vv = _bytes(v_cache).view(-1, hkv * d).index_select(0, slots).view(v_cache.dtype)
        kk, vv = kk.view(b, max_len, hkv, d).to(work), vv.view(b, max_len, hkv, d).to(work)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), kk.transpose(1, 2), vv.transpose(1, 2),
            attn_mask=mask, scale=scale, enable_gqa=group > 1)
        return o.squeeze(2)

    @staticmethod
    def _extend(q, kk, vv, scale, group, mask=None):
        """``mask`` [n, L] bool (a tree chunk), else causal."""
        n, L = q.shape[0], kk.shape[0]
        qt, kt, vt = q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1)
        if mask is not None:
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        elif n == L:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=group > 1)
        else:
            # query i sits at position L - n + i and sees keys 0 .. L - n + i
            pos_q = torch.arange(L - n, L, device=q.device)[:, None]
            mask = torch.arange(L, device=q.device)[None, :] <= pos_q
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        return o.transpose(0, 1)
