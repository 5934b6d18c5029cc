"""All-reduce on CUDA for one tensor-parallel group: NCCL, or a one-shot all-reduce over
peer-mapped ("symmetric") memory for the small messages of decode steps.

One-shot (as in vLLM's and SGLang's custom all-reduce): every rank copies its partial sum
into its own slot of a buffer that every peer has mapped (CUDA IPC / VMM, through
``torch.distributed._symmetric_memory``), a barrier over signal pads, then every rank reads
all peers' slots and sums them itself. One kernel step, no ring: the latency of a few
microseconds where NCCL's ring/tree protocols cost tens. Above ``one_shot_max_bytes`` the
bandwidth of NCCL wins. All of it is capturable in CUDA graphs.

Buffer reuse: the op starts with a barrier, so a rank entering all-reduce k+1 only knows
that every peer has *entered* k, not that it has finished reading k's buffers. Two buffers
are used alternately (ping-pong): a rank writing buffer A for all-reduce k+2 has passed the
barrier of k+1, so every peer is done reading A for k. The alternation is baked into CUDA
graphs at capture, so it holds across graph replays only if every forward runs an even
number of one-shot all-reduces — it does: two per layer (the embedding is replicated,
see ``models/decoder.py``).

``mode``: ``"nccl"`` (always NCCL), ``"one_shot"`` (one-shot up to the size limit, NCCL
above), ``"auto"`` (= one_shot where symmetric memory is available, else NCCL).
Raises ``ValueError`` on an unknown mode.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger("miniinfer")

MODES = ("auto", "nccl", "one_shot")
ONE_SHOT_MAX_BYTES = 512 * 1024  # the crossover measured on 2x H200 (benchmarks/allreduce_bench.py)


def symm_mem_available() -> bool:
    try:
        return torch.cuda.is_available() and hasattr(torch.ops.symm_mem, "one_shot_all_reduce")
    except (AttributeError, RuntimeError):
        return False


class CudaCommunicator:
    """``all_reduce(x)`` for one process group on the current CUDA device (sum)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 mode: str = "auto", one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES):
        if mode not in MODES:
            raise ValueError(f"all_reduce_mode must be one of {MODES}, got {mode!r}")
        self.group = group
        self.group_name = group.group_name
        self.dtype = dtype
        self.mode = "nccl"
        self.max_numel = one_shot_max_bytes // torch.empty((), dtype=dtype).element_size()
        self._halves: list[torch.Tensor] = []
        self._turn = 0
        self._copy_op = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy") if mode != "nccl" else False
        if mode != "nccl":
            try:
                self._setup_symm_mem(device)
                self.mode = "one_shot"
            except Exception as e:  # noqa: BLE001 - any failure: NCCL still works
                if mode == "one_shot":
                    raise RuntimeError(f"one-shot all-reduce unavailable: {e}") from e
                log.warning("symmetric-memory all-reduce unavailable (%s); using NCCL", e)

    def _setup_symm_mem(self, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem
        if not symm_mem_available():
            raise RuntimeError("torch.ops.symm_mem.one_shot_all_reduce is missing")
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(self.group_name)
        for _ in range(2):  # two allocations (each with its own signal pad), not two halves of one
            buf = symm_mem.empty(self.max_numel, dtype=self.dtype, device=device)
            symm_mem.rendezvous(buf, self.group_name)
            self._halves.append(buf)
        # one round on both halves: fails here, at start-up, if the peers can't be mapped
        for _ in range(2):
            x = torch.ones(8, dtype=self.dtype, device=device)
            y = self._one_shot(x)
            torch.cuda.synchronize()
            if not torch.all(y == dist.get_world_size(self.group)):
                raise RuntimeError("one-shot all-reduce returned a wrong sum")

    def uses_one_shot(self, x: torch.Tensor) -> bool:
        return self.mode == "one_shot" and x.dtype == self.dtype and x.numel() <= self.max_numel

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the group, same shape and dtype; NCCL reduces in place."""
        if self.uses_one_shot(x):
            return self._one_shot(x)
        dist.all_reduce(x, group=self.group)
        return x

    def _one_shot(self, x: torch.Tensor) -> torch.Tensor:
        half = self._halves[self._turn]
        self._turn ^= 1
        n = x.numel()
        if self._copy_op:  # the copy into the peer-mapped buffer happens inside the kernel
            return torch.ops.symm_mem.one_shot_all_reduce_copy(half[:n], x.reshape(-1), "sum",
                                                               self.group_name).view(x.shape)
        half[:n].copy_(x.reshape(-1))
        return torch.ops.symm_mem.one_shot_all_reduce(half[:n], "sum", self.group_name).view(x.shape)
