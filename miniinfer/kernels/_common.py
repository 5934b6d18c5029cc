"""Small helpers shared by the Triton kernel wrappers (imports triton lazily via callers)."""
from __future__ import annotations

import functools
import os

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


# Programmatic dependent launch (kernels/pdl.py) for the decode-path kernels; MINIINFER_PDL=0
# turns it off (A/B). Read at each launch, so a benchmark may flip it between engine builds.
PDL = os.environ.get("MINIINFER_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _cc_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl_launch(device: torch.device) -> dict:
    """Extra kwargs for a Triton launch of a kernel with a ``USE_PDL`` constexpr:
    ``{"USE_PDL": True, "launch_pdl": True}`` on sm_90+ CUDA devices while ``PDL`` is on,
    else ``{"USE_PDL": False}`` (CPU interpreter, older GPUs, ROCm, ``MINIINFER_PDL=0``)."""
    if PDL and device.type == "cuda" and torch.version.hip is None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if _cc_major(index) >= 9:
            return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


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


# --- FP8 (e4m3) KV cache ---------------------------------------------------------------
FP8_E4M3_MAX = 448.0  # the largest finite float8_e4m3fn; writes saturate to +-this


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether a KV-cache dtype is the FP8 one (``torch.float8_e4m3fn``)."""
    return dtype == torch.float8_e4m3fn


# FP8 cache: the kernels convert K/V tiles to fp16 and run the dots in fp16 (Triton's e4m3 -> bf16
# cast is several instructions, e4m3 -> fp16 one per pair). H200, 128 contexts of 4k-8k: decode
# 775 -> 645 us, 539 us with 128-key tiles (bf16 cache 763 us). MINIINFER_FP8_F16_DOT=0: the dots
# in q's dtype, for A/B.
FP8_F16_DOT = os.environ.get("MINIINFER_FP8_F16_DOT", "1") != "0"


def fp16_dots(cache_dtype: torch.dtype, q_dtype: torch.dtype, override: bool | None = None) -> bool:
    """Whether the attention kernels run their dots in fp16 (an FP8 cache under a bf16/fp16 q;
    fp32 runs stay exact). ``override`` replaces ``FP8_F16_DOT``."""
    return is_fp8(cache_dtype) and q_dtype != torch.float32 and (FP8_F16_DOT if override is None else override)


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x / scale`` in fp32, saturated to +-448, rounded to ``float8_e4m3fn`` (same shape).
    The stored value ``q`` stands for ``q * scale`` (vLLM's convention)."""
    inv = 1.0 / scale
    return (x.float() * inv).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(x: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x.float() * scale`` in ``dtype`` (the inverse of :func:`quantize_fp8`, up to rounding)."""
    return (x.float() * scale).to(dtype)


def pages_f32(cache: torch.Tensor, pages: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``cache[pages]`` (cache ``[num_blocks, block_size, Hkv, D]``, pages int64) as fp32
    ``[len(pages) * block_size, Hkv, D]``; an FP8 cache dequantized (``* scale``), others cast."""
    Hkv, D = cache.shape[2], cache.shape[3]
    if is_fp8(cache.dtype):  # no CPU gather kernel for fp8: gather the bytes
        return dequantize_fp8(cache.view(torch.uint8)[pages].view(cache.dtype), scale).reshape(-1, Hkv, D)
    return cache[pages].reshape(-1, Hkv, D).float()
