"""All-reduce on CUDA for one tensor-parallel group: NCCL, or all-reduces over peer-mapped
("symmetric") memory, as vLLM's and SGLang's custom all-reduce, through torch's
``torch.distributed._symmetric_memory`` (CUDA IPC / VMM mappings, signal-pad barriers).

* one-shot (small messages): every rank's partial sum goes into its own peer-mapped buffer,
  a barrier, then every rank reads all peers' buffers and sums them itself — one kernel
  (``one_shot_all_reduce_copy`` does the copy in too), no ring protocol.
* two-shot (larger): reduce-scatter then all-gather over the same mappings: each rank sums
  one slice from all peers and writes it into every peer's buffer; the result is read in
  place from this rank's buffer.
* NCCL above ``two_shot_max_bytes`` (or for anything else: other dtypes, ``mode="nccl"``).

Measured on 2x H200 (NVLink, ``benchmarks/allreduce_bench.py``, bf16, inside CUDA graphs):
NCCL ~8 µs up to 64 KB, 15.7 µs at 1 MB, 153 µs at 32 MB; two-shot 7.4 µs at 8 KB, 11.7 µs
at 1 MB, 128 µs at 32 MB. All of these are capturable in CUDA graphs.

Buffer reuse: each op starts with a barrier, so a rank entering all-reduce k+1 only knows
that every peer has *entered* k, not that it is done with k's buffers. Two buffers are used
alternately (ping-pong): a rank writing buffer A for all-reduce k+2 has passed the barrier
of k+1, so every peer is done with A for k. The alternation is baked into CUDA graphs at
capture, so it holds across replays only if every forward runs an even number of these
all-reduces — it does: two per layer, all of one size (the embedding is replicated, see
``models/decoder.py``).

``mode``: ``"nccl"``, ``"symm_mem"`` (one-shot / two-shot by size, NCCL above; raises
``RuntimeError`` if unavailable) or ``"auto"`` (symm_mem where available, else NCCL).
Raises ``ValueError`` on an unknown mode.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist

log = logging.getLogger("miniinfer")

MODES = ("auto", "nccl", "symm_mem")
# Group names this process has mapped symmetric memory for. torch keeps that registration per
# group name for the process's life; a later group reuses the name ("0") and its rendezvous was
# seen to hang on 2x H200 (a second TP engine in one process). Process-level fact, not step state.
_SYMM_MEM_GROUPS: set[str] = set()
ONE_SHOT_MAX_BYTES = 256 * 1024
TWO_SHOT_MAX_BYTES = 64 * 1024 * 1024  # a prefill chunk of 8192 tokens x 3584 x bf16 is 58.7 MB


def symm_mem_used_in_process() -> bool:
    """Whether this process already set up symmetric memory for a (now gone) group."""
    return bool(_SYMM_MEM_GROUPS)


def symm_mem_available() -> bool:
    try:
        ops = torch.ops.symm_mem
        return torch.cuda.is_available() and hasattr(ops, "one_shot_all_reduce") and hasattr(ops, "two_shot_all_reduce_")
    except (AttributeError, RuntimeError):
        return False


class CudaCommunicator:
    """``all_reduce(x)`` (sum) for one process group on the current CUDA device."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype,
                 mode: str = "auto", one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES,
                 two_shot_max_bytes: int = TWO_SHOT_MAX_BYTES):
        if mode not in MODES:
            raise ValueError(f"all_reduce_mode must be one of {MODES}, got {mode!r}")
        self.group = group
        self.group_name = group.group_name
        self.dtype = dtype
        size = torch.empty((), dtype=dtype).element_size()
        self.one_shot_numel = one_shot_max_bytes // size
        self.max_numel = max(two_shot_max_bytes, one_shot_max_bytes) // size
        self.mode = "nccl"
        self._buffers: list[torch.Tensor] = []
        self._turn = 0
        self._copy_op = False
        if mode != "nccl":
            try:
                self._setup_symm_mem(device)
                self.mode = "symm_mem"
            except Exception as e:  # noqa: BLE001 - any failure: NCCL still works
                if mode == "symm_mem":
                    raise RuntimeError(f"symmetric-memory all-reduce unavailable: {e}") from e
                log.warning("symmetric-memory all-reduce unavailable (%s); using NCCL", e)

    def _setup_symm_mem(self, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem
        if not symm_mem_available():
            raise RuntimeError("torch.ops.symm_mem has no one_shot_all_reduce / two_shot_all_reduce_")
        self._copy_op = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy")
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.9, a no-op that warns after
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(self.group_name)
        _SYMM_MEM_GROUPS.add(self.group_name)
        for _ in range(2):  # two allocations (each with its own signal pad), not two halves of one
            buf = symm_mem.empty(self.max_numel, dtype=self.dtype, device=device)
            symm_mem.rendezvous(buf, self.group_name)
            self._buffers.append(buf)
        # both methods on both buffers: fails here, at start-up, if the peers can't be mapped
        world = dist.get_world_size(self.group)
        for n in (8, min(self.one_shot_numel + 8, self.max_numel)) * 2:
            y = self._symm(torch.ones(n, dtype=self.dtype, device=device))
            torch.cuda.synchronize()
            if not torch.all(y == world):
                raise RuntimeError("symmetric-memory all-reduce returned a wrong sum")

    def method(self, x: torch.Tensor) -> str:
        """``"one_shot"``, ``"two_shot"`` or ``"nccl"``: what ``all_reduce(x)`` uses."""
        if self.mode != "symm_mem" or x.dtype != self.dtype or x.numel() > self.max_numel:
            return "nccl"
        return "one_shot" if x.numel() <= self.one_shot_numel else "two_shot"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` [any shape] over the group, same shape and dtype. NCCL reduces in
        place; the others return a tensor valid until the second all-reduce after this one."""
        if self.method(x) == "nccl":
            dist.all_reduce(x, group=self.group)
            return x
        return self._symm(x)

    def _symm(self, x: torch.Tensor) -> torch.Tensor:
        buf = self._buffers[self._turn]
        self._turn ^= 1
        n, ops = x.numel(), torch.ops.symm_mem
        inp = buf[:n]
        if n <= self.one_shot_numel:
            if self._copy_op:  # the copy into the peer-mapped buffer happens inside the kernel
                return ops.one_shot_all_reduce_copy(inp, x.reshape(-1), "sum", self.group_name).view(x.shape)
            inp.copy_(x.reshape(-1))
            return ops.one_shot_all_reduce(inp, "sum", self.group_name).view(x.shape)
        inp.copy_(x.reshape(-1))
        ops.two_shot_all_reduce_(inp, "sum", self.group_name)
        return inp.view(x.shape)
