"""KV-cache sizing and allocation.

The runner decides once, at start-up, how many blocks the cache holds and what that means
for the longest sequence; the result is a frozen :class:`KVCacheLayout` that the engine
reads once (scheduler, input checks). Nothing flows back.

On CUDA the budget is what is left of ``total × gpu_memory_utilization`` after the weights,
a profiling forward of ``max_num_batched_tokens`` tokens and other processes; on CPU it is
``kv_cache_memory_gb`` (default 2 GiB). Either way it is capped at ``max_num_seqs`` full-length
sequences, and if it holds fewer tokens than the requested ``max_model_len``, the layout's
``max_model_len`` is lowered to the cache's capacity (with a warning).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("miniinfer")


@dataclass(frozen=True)
class KVCacheLayout:
    num_blocks: int
    block_size: int  # tokens per block
    num_layers: int
    num_kv_heads: int  # this rank's
    head_dim: int
    dtype: torch.dtype
    max_model_len: int  # the longest sequence the engine accepts (≤ the requested one)

    @property
    def shape(self) -> tuple[int, ...]:
        """[K/V, layers, blocks, block_size, kv_heads, head_dim]."""
        return (2, self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


def bytes_per_block(block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def num_blocks_for_budget(budget_bytes: int, per_block: int, max_model_len: int, block_size: int,
                          max_num_seqs: int) -> int:
    """Blocks in the budget, capped at ``max_num_seqs`` full-length sequences.
    Raises ``ValueError`` when the budget holds less than a quarter of one sequence."""
    per_seq = -(-max_model_len // block_size)
    n = min(max_num_seqs * per_seq, budget_bytes // per_block)
    if n < per_seq // 4 or n < 1:
        raise ValueError(f"KV-cache budget holds only {n} blocks of {block_size} tokens; "
                         f"raise the memory budget or lower max_model_len ({max_model_len})")
    return n


def free_gpu_bytes_after(profile_step, gpu_memory_utilization: float) -> int:
    """Run ``profile_step()`` (the largest forward) and return what is left for the KV cache."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    profile_step()
    torch.cuda.synchronize()
    # The profiling step's activation blocks stay in PyTorch's allocator cache (no
    # empty_cache): the first real large step reuses them instead of paying cudaMalloc
    # mid-request (a fresh 2k-token prefill measured 34 ms the first time, 16 ms later).
    # So the budget subtracts what the allocator *reserves*, not just the peak in use.
    reserved = max(torch.cuda.memory_reserved(), torch.cuda.max_memory_allocated())
    free, total = torch.cuda.mem_get_info()
    used_by_others = total - free - torch.cuda.memory_reserved()
    return max(int(total * gpu_memory_utilization) - reserved - max(used_by_others, 0), 0)


def make_layout(num_blocks: int, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, requested_max_model_len: int) -> KVCacheLayout:
    capacity = num_blocks * block_size
    max_len = requested_max_model_len
    if max_len > capacity:
        log.warning("max_model_len lowered from %d to %d: the KV cache holds no more", max_len, capacity)
        max_len = capacity
    return KVCacheLayout(num_blocks, block_size, num_layers, num_kv_heads, head_dim, dtype, max_len)


def allocate_kv_cache(model, layout: KVCacheLayout, device: torch.device) -> torch.Tensor:
    """One zeroed tensor of ``layout.shape``; each attention layer gets views of its K and V."""
    caches = torch.zeros(layout.shape, dtype=layout.dtype, device=device)
    bind_kv_cache(model, caches)
    return caches


def bind_kv_cache(model, caches: torch.Tensor | None) -> None:
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        attn.k_cache, attn.v_cache = (caches[0, i], caches[1, i]) if caches is not None else (torch.empty(0),) * 2
