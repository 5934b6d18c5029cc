"""KV-cache sizing and allocation.

The runner decides once, at start-up, how many blocks the cache holds and what that means
for the longest sequence; the result is a frozen :class:`KVCacheLayout` that the engine
reads once (scheduler, input checks). Nothing flows back.

On CUDA the budget is what is left of ``total × gpu_memory_utilization`` after the weights,
a profiling forward of ``max_num_batched_tokens`` tokens and other processes; on CPU it is
``kv_cache_memory_gb`` (default 2 GiB). Either way it is capped at ``max_num_seqs`` full-length
sequences, and if it holds fewer tokens than the requested ``max_model_len``, the layout's
``max_model_len`` is lowered to the cache's capacity (with a warning).

The cache dtype (``kv_cache_torch_dtype``): the model dtype on CUDA, fp32 on CPU, or with
``kv_cache_dtype="fp8"`` / ``"fp8_e4m3"`` (CUDA only) ``torch.float8_e4m3fn``: one byte per
value, so the same budget holds twice the bf16 blocks. An fp8 value ``q`` stands for
``q * k_scale`` (keys) or ``q * v_scale`` (values): per-tensor fp32 scales, one global pair,
1.0 by default (vLLM's default without calibration data); they are put on the attention
backend when the cache is allocated.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from miniinfer.kernels._common import is_fp8

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
    k_scale: float = 1.0  # fp8 caches only: key = fp8 * k_scale
    v_scale: float = 1.0  # fp8 caches only: value = fp8 * v_scale

    @property
    def shape(self) -> tuple[int, ...]:
        """[K/V, layers, blocks, block_size, kv_heads, head_dim]."""
        return (2, self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The cache tensor's dtype for ``EngineConfig.kv_cache_dtype``: ``"auto"`` is the model
    dtype on CUDA and float32 elsewhere (the torch path computes in fp32 on CPU: no upcast
    copy per gather); ``"fp8"`` / ``"fp8_e4m3"`` is ``torch.float8_e4m3fn``. Raises
    ``ValueError`` for another name, or for fp8 off CUDA (EngineConfig rejects both first)."""
    if kv_cache_dtype == "auto":
        return model_dtype if device_type == "cuda" else torch.float32
    if kv_cache_dtype not in ("fp8", "fp8_e4m3"):
        raise ValueError(f"kv_cache_dtype must be auto, fp8 or fp8_e4m3, got {kv_cache_dtype!r}")
    if device_type != "cuda":
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is a GPU option, not for device {device_type!r}")
    return torch.float8_e4m3fn


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
    """One zeroed tensor of ``layout.shape`` and ``layout.dtype``; each attention layer gets
    views of its K and V. An fp8 layout also sets its ``k_scale``/``v_scale`` on the layers'
    attention backend (read by every layer's store and attention)."""
    caches = torch.zeros(layout.shape, dtype=layout.dtype, device=device)
    bind_kv_cache(model, caches)
    if is_fp8(layout.dtype):
        for layer in model.layers:
            backend = getattr(layer.self_attn, "backend", None)
            if backend is not None:
                backend.k_scale, backend.v_scale = layout.k_scale, layout.v_scale
    return caches


def bind_kv_cache(model, caches: torch.Tensor | None) -> None:
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        attn.k_cache, attn.v_cache = (caches[0, i], caches[1, i]) if caches is not None else (torch.empty(0),) * 2
