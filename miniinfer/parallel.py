"""Tensor parallelism: the rank's place in the group, collectives, and weight shards.

Rank 0 is the engine process (scheduler, sampler, front ends); ranks 1..N-1 are worker
processes (started by the engine, or by ``torchrun``), each holding a shard of every layer
and of the KV cache. Every rank runs every forward, fed by ``worker/step_channel.py``.

    column-parallel: qkv_proj, gate_up_proj   (output rows split: heads / intermediate)
    row-parallel:    o_proj, down_proj         (input columns split, then all-reduce)
    vocab-parallel:  lm_head                   (vocab rows split, then all-gather)
    replicated:      embed_tokens, norms       (a tied LM head uses this rank's vocab rows)

KV heads are split across ranks when there are at least as many as ranks, and replicated
(rank r holds head r // (tp / num_kv_heads)) when there are fewer. On CUDA the all-reduces
go through ``comm.CudaCommunicator`` (NCCL or one-shot over symmetric memory).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from miniinfer.models import ops

# Never use NVLink multicast (NVLS): it is unreliable on the shared GPU hosts.
TP_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    comm: Any = field(default=None, compare=False)  # comm.CudaCommunicator on CUDA, else None
    single_host: bool = True  # every rank on this machine (the step channel may use shared memory)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (in place for NCCL / gloo; a new tensor for one-shot)."""
        if self.size == 1:
            return x
        if self.comm is not None:
            return self.comm.all_reduce(x)
        dist.all_reduce(x)
        return x

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual <- all_reduce(x) + residual``; returns ``(rmsnorm(residual) * weight,
        residual)``: ``x`` [T, N] is this rank's partial sum (may be overwritten), ``residual``
        [T, N] and ``weight`` [N] are replicated. One rank: ``ops.fused_add_rms_norm`` alone;
        CUDA: ``comm.CudaCommunicator.all_reduce_add_rms_norm`` (one fused kernel for decode
        sizes unless ``MINIINFER_FUSED_AR_NORM=0``); gloo: all-reduce, then add + norm."""
        if self.size == 1:
            return ops.fused_add_rms_norm(x, residual, weight, eps)
        if self.comm is not None:
            return self.comm.all_reduce_add_rms_norm(x, residual, weight, eps)
        dist.all_reduce(x)
        return ops.fused_add_rms_norm(x, residual, weight, eps)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [N, D] from every rank -> [N, size * D] in rank order (one collective)."""
        if self.size == 1:
            return x
        n, d = x.shape
        out = torch.empty(self.size * n, d, dtype=x.dtype, device=x.device)
        _all_gather(out, x.contiguous())
        return out.view(self.size, n, d).transpose(0, 1).reshape(n, self.size * d)

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


# torch >= 2.13 renamed it (the old name warns); the GPU machine's torch has the old one only
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def init_tp(rank: int, size: int, init_method: str, device: str, dtype: torch.dtype = torch.bfloat16,
            all_reduce_mode: str = "auto", single_host: bool = True) -> TPGroup:
    """Join the group (``init_method``: ``tcp://host:port`` or ``env://`` under torchrun);
    on CUDA rank r drives GPU ``local rank`` = r modulo the GPUs visible."""
    os.environ.update(TP_ENV)
    if size == 1:
        return TPGroup()
    cuda = device.startswith("cuda")
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a process group (an earlier tensor-parallel "
                           "engine that could not leave it): start tensor parallelism in a new process")
    kw = {}
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        kw["device_id"] = torch.device("cuda", local)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=size, **kw)
    comm = None
    if cuda:
        from miniinfer.comm import CudaCommunicator
        dist.all_reduce(torch.ones(1, device="cuda"))  # NCCL's communicator exists before any graph capture
        comm = CudaCommunicator(dist.group.WORLD, torch.device("cuda", torch.cuda.current_device()), dtype,
                                all_reduce_mode if single_host else "nccl")
    return TPGroup(rank, size, comm, single_host)
