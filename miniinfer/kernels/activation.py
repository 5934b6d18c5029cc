"""Gated activation: ``silu_and_mul(x [T, 2I]) -> silu(x[:, :I]) * x[:, I:]`` (fp32 math)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from miniinfer.kernels._common import next_pow2, pdl_launch
from miniinfer.kernels.pdl import pdl_wait


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_o, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    row = x_ptr + t * stride_x
    a = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(row + I + offs, mask=mask, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b
    tl.store(out_ptr + t * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [T, 2I]`` (rows may be strided, last dim contiguous) -> ``[T, I]``."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1
    T, I2 = x.shape
    I = I2 // 2
    if out is None:
        out = torch.empty((T, I), dtype=x.dtype, device=x.device)
    assert out.shape == (T, I) and out.stride(1) == 1
    if T == 0:
        return out
    block = min(1024, next_pow2(I))
    num_warps = 4 if block >= 512 else (2 if block >= 256 else 1)
    grid = (T, triton.cdiv(I, block))
    _silu_and_mul_kernel[grid](x, out, I, x.stride(0), out.stride(0), BLOCK=block, num_warps=num_warps,
                               **pdl_launch(x.device))
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    I = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :I]) * xf[..., I:]).to(x.dtype)
