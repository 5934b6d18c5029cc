"""Small helpers shared by the Triton kernel wrappers (imports triton lazily via callers)."""
from __future__ import annotations

import functools

import torch


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant for the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms(index)


def dot_upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether tl.dot operands must be upcast to fp32.

    Triton's CPU interpreter (TRITON_INTERPRET=1) stores bf16 as raw uint16 and its
    tl.dot multiplies those integers; upcasting in the kernel works around it. Compiled
    GPU kernels never take this path.
    """
    return device.type != "cuda" and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact ("ieee") products so fp32 runs can be compared tightly with torch;
    # fp16/bf16 ignore this and use tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"
