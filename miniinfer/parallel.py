"""Tensor parallelism: the rank's place in the group, collectives, and weight shards.

Rank 0 is the engine process (scheduler, sampler, front ends); ranks 1..N-1 are worker
processes it starts, each holding a shard of every layer and of the KV cache. Every rank runs
every forward; rank 0 broadcasts each step's packed inputs (one int64 tensor, no pickle).

    column-parallel: qkv_proj, gate_up_proj   (output rows split: heads / intermediate)
    row-parallel:    o_proj, down_proj         (input columns split, then all-reduce)
    vocab-parallel:  embed_tokens, lm_head     (vocab rows split; all-reduce / all-gather)

KV heads are split across ranks when there are at least as many as ranks, and replicated
(rank r holds head r // (tp / num_kv_heads)) when there are fewer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Never use NVLink multicast (NVLS): it is unreliable on the shared GPU hosts.
TP_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x

    # --- shards -----------------------------------------------------------------------
    def split(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what} ({n}) must be divisible by tensor_parallel_size ({self.size})")
        return n // self.size

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(local KV heads, index of this rank's first KV head)."""
        if num_kv_heads >= self.size:
            local = self.split(num_kv_heads, "num_key_value_heads")
            return local, self.rank * local
        if self.size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size ({self.size}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads}) when it is larger")
        return 1, self.rank // (self.size // num_kv_heads)


def init_tp(rank: int, size: int, init_method: str, device: str) -> TPGroup:
    os.environ.update(TP_ENV)
    if size == 1:
        return TPGroup()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    return TPGroup(rank, size)
