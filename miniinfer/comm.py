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

Fused all-reduce + residual add + RMSNorm (``all_reduce_add_rms_norm``, on by default,
``MINIINFER_FUSED_AR_NORM=0`` turns it off; 2x H200, Qwen2-7B TP=2 batch-1 TPOT 2.82 -> 2.69
ms, docs/BENCHMARKS.md §13): decode-sized messages (up to
``kernels/allreduce_norm.MAX_ROWS`` rows) go through one Triton kernel that copies the
partial in, barriers, sums every rank's row in rank order and applies the add + norm. It uses
its own two allocations (own signal pads) with its own turn, so the ping-pong argument holds
for it alone: the decoder routes every all-reduce of a forward through this method, all of
one shape, two per layer, so a forward uses either the fused kernel an even number of times
or never. Anything else (prefill, NCCL, other dtypes) is ``all_reduce`` + ``fused_add_rms_norm``.

``mode``: ``"nccl"``, ``"symm_mem"`` (one-shot / two-shot by size, NCCL above; raises
``RuntimeError`` if unavailable) or ``"auto"`` (symm_mem where available, else NCCL).
Raises ``ValueError`` on an unknown mode.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.distributed as dist

from miniinfer.models import ops

log = logging.getLogger("miniinfer")

MODES = ("auto", "nccl", "symm_mem")
# Group names this process has mapped symmetric memory for. torch keeps that registration per
# group name for the process's life; a later group reuses the name ("0") and its rendezvous was
# seen to hang on 2x H200 (a second TP engine in one process). Process-level fact, not step state.
_SYMM_MEM_GROUPS: set[str] = set()
ONE_SHOT_MAX_BYTES = 256 * 1024
TWO_SHOT_MAX_BYTES = 64 * 1024 * 1024  # a prefill chunk of 8192 tokens x 3584 x bf16 is 58.7 MB
FUSED_AR_NORM_ENV = "MINIINFER_FUSED_AR_NORM"


def fused_ar_norm_requested() -> bool:
    """Whether the fused all-reduce + add + RMSNorm kernel is wanted: yes unless
    ``MINIINFER_FUSED_AR_NORM`` is ``0`` / ``false`` / ``off`` / ``no``."""
    return os.environ.get(FUSED_AR_NORM_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


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
                 two_shot_max_bytes: int = TWO_SHOT_MAX_BYTES, fused_norm: bool | None = None):
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
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._arn = None  # kernels/allreduce_norm once the fused path is set up (imports triton)
        # fused all-reduce + add + RMSNorm: (buffer pointers, signal pad pointers) of two allocations
        self._fused: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fused_keep: list[torch.Tensor] = []  # the allocations behind those pointers
        self._fused_turn = 0
        self._pad_bytes = 0
        if mode != "nccl":
            try:
                self._setup_symm_mem(device)
                self.mode = "symm_mem"
            except Exception as e:  # noqa: BLE001 - any failure: NCCL still works
                if mode == "symm_mem":
                    raise RuntimeError(f"symmetric-memory all-reduce unavailable: {e}") from e
                log.warning("symmetric-memory all-reduce unavailable (%s); using NCCL", e)
        if self.mode == "symm_mem":
            # every rank must take the same decision (the fused set-up is collective)
            want = fused_ar_norm_requested() if fused_norm is None else fused_norm
            flag = torch.tensor([int(want)], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
            if int(flag.item()):
                self._setup_fused(device)

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
        world = self.world_size
        for n in (8, min(self.one_shot_numel + 8, self.max_numel)) * 2:
            y = self._symm(torch.ones(n, dtype=self.dtype, device=device))
            torch.cuda.synchronize()
            if not torch.all(y == world):
                raise RuntimeError("symmetric-memory all-reduce returned a wrong sum")

    def _setup_fused(self, device: torch.device) -> None:
        """Two allocations for the fused kernel, checked on both; if that fails on any rank
        (the ranks agree through one NCCL all-reduce) the fused path stays off, with a warning."""
        try:
            self._alloc_fused(device)
            self._check_fused(device)
            ok = 1
        except Exception as e:  # noqa: BLE001 - the unfused path still works
            log.warning("fused all-reduce + RMSNorm unavailable (%s); using all-reduce + fused_add_rms_norm", e)
            ok = 0
        agree = torch.tensor([ok], dtype=torch.int32, device=device)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN, group=self.group)
        if not int(agree.item()):
            self._fused, self._fused_keep, self._arn = [], [], None

    def _alloc_fused(self, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem
        from miniinfer.kernels import allreduce_norm as arn
        self._pad_bytes = symm_mem.get_signal_pad_size() if hasattr(symm_mem, "get_signal_pad_size") else 2048
        for _ in range(2):
            buf = symm_mem.empty(arn.MAX_ROWS * arn.MAX_HIDDEN, dtype=self.dtype, device=device)
            hdl = symm_mem.rendezvous(buf, self.group_name)
            # the handle's pointers are the allocations' starts; the tensor sits at the same
            # offset in every rank's (symmetric) allocation
            offset = buf.data_ptr() - hdl.buffer_ptrs[self.rank]
            self._fused.append((torch.tensor([p + offset for p in hdl.buffer_ptrs], dtype=torch.int64, device=device),
                                torch.tensor(list(hdl.signal_pad_ptrs), dtype=torch.int64, device=device)))
            self._fused_keep.append(buf)
        self._arn = arn

    def _check_fused(self, device: torch.device) -> None:
        """Rows of ``rank + 1`` on every rank through both allocations: the residual must come
        out as ``world (world + 1) / 2`` and the norm of a constant row as 1."""
        world = self.world_size
        for rows in (1, 3):
            x = torch.full((rows, 64), float(self.rank + 1), dtype=self.dtype, device=device)
            weight = torch.ones(64, dtype=self.dtype, device=device)
            normed, res = self.all_reduce_add_rms_norm(x, torch.zeros_like(x), weight, 1e-6)
            torch.cuda.synchronize()
            if not (torch.all(res == world * (world + 1) // 2) and torch.allclose(normed.float(), weight.float(),
                                                                                  atol=1e-2)):
                raise RuntimeError("fused all-reduce + RMSNorm returned a wrong result")
        if self._fused_turn:
            raise RuntimeError("fused all-reduce + RMSNorm: the self-check did not use both buffers")

    @property
    def fused_norm(self) -> bool:
        """Whether ``all_reduce_add_rms_norm`` can use the fused kernel (for messages that fit)."""
        return bool(self._fused)

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual <- sum over the group of x + residual`` (in place); returns
        ``(rmsnorm(residual) * weight, residual)``. ``x`` [T, N] is this rank's partial sum
        (overwritten); ``residual`` [T, N] and ``weight`` [N] are the same on every rank.
        One fused kernel where it fits (see the module doc), else ``all_reduce`` +
        ``fused_add_rms_norm``. The normed tensor is valid until the second all-reduce after it."""
        arn = self._arn
        if (arn is not None and x.dtype == self.dtype and residual.dtype == x.dtype and residual.stride(-1) == 1
                and arn.fits(x, arn.MAX_ROWS * arn.MAX_HIDDEN, self.world_size, self._pad_bytes)):
            buffer_ptrs, pad_ptrs = self._fused[self._fused_turn]
            self._fused_turn ^= 1
            arn.allreduce_add_rms_norm_(x, residual, weight, eps, buffer_ptrs, pad_ptrs, self.rank)
            return x, residual
        return ops.fused_add_rms_norm(self.all_reduce(x), residual, weight, eps)

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
