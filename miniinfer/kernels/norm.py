"""RMSNorm kernels (fp32 math, output in the input dtype).

* ``rms_norm(x, weight, eps, out=None)``: ``x`` is ``[T, N]`` or ``[T, H, N]`` (per-head
  norm, e.g. Qwen3 QK-norm on a strided q/k view); any outer strides, last dim stride 1.
  ``out`` may be ``x`` itself (in place).
* ``fused_add_rms_norm_(x, residual, weight, eps)``: in place,
  ``residual <- x + residual`` (rounded to the dtype) and ``x <- rmsnorm(residual) * weight``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from miniinfer.kernels._common import next_pow2, pdl_launch
from miniinfer.kernels.pdl import pdl_wait

_MAX_N = 65536


@triton.jit(do_not_specialize=["num_rows", "inner"])  # row counts vary per step
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr,
    num_rows, inner, stride_x0, stride_x1, stride_o0, stride_o1,
    N, eps,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    # Rows r = (i, j) with i = r // inner, j = r % inner (inner = 1 for 2-D inputs).
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < num_rows
    rows = rows.to(tl.int64)
    i = rows // inner
    j = rows % inner
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = mask_r[:, None] & mask_n[None, :]
    x = tl.load(x_ptr + (i * stride_x0 + j * stride_x1)[:, None] + offs_n[None, :],
                mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(out_ptr + (i * stride_o0 + j * stride_o1)[:, None] + offs_n[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_rows"])
def _fused_add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, num_rows, stride_x, stride_r, N, eps,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < num_rows
    rows = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = mask_r[:, None] & mask_n[None, :]
    x_ptrs = x_ptr + (rows * stride_x)[:, None] + offs_n[None, :]
    r_ptrs = r_ptr + (rows * stride_r)[:, None] + offs_n[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(r_ptr.dtype.element_ty)
    tl.store(r_ptrs, s, mask=mask)
    s = s.to(tl.float32)
    var = tl.sum(s * s, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = s * rstd[:, None] * w[None, :]
    tl.store(x_ptrs, y.to(x_ptr.dtype.element_ty), mask=mask)


def _launch_cfg(num_rows: int, N: int) -> tuple[int, int, int]:
    assert N <= _MAX_N, f"rms_norm supports rows up to {_MAX_N} elements, got {N}"
    block_n = next_pow2(N)
    # Pack several short rows (e.g. per-head norm over D=128) into one program.
    block_r = max(1, min(2048 // block_n, next_pow2(num_rows), 16))
    elems = block_r * block_n
    num_warps = 1 if elems <= 256 else 2 if elems <= 512 else 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    return block_r, block_n, num_warps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of ``x [T, N]`` or ``x [T, H, N]``; returns ``out``."""
    N = x.shape[-1]
    assert weight.shape == (N,) and weight.stride(0) == 1
    if x.dim() not in (2, 3):
        x = x.reshape(-1, N)
        if out is not None:
            out = out.view(-1, N)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    assert out.shape == x.shape
    assert x.stride(-1) == 1 and out.stride(-1) == 1, "last dim must be contiguous"
    if x.dim() == 2:
        num_rows, inner = x.shape[0], 1
        sx0, sx1, so0, so1 = x.stride(0), 0, out.stride(0), 0
    else:
        num_rows, inner = x.shape[0] * x.shape[1], x.shape[1]
        sx0, sx1, so0, so1 = x.stride(0), x.stride(1), out.stride(0), out.stride(1)
    if num_rows == 0:
        return out
    block_r, block_n, num_warps = _launch_cfg(num_rows, N)
    grid = (triton.cdiv(num_rows, block_r),)
    _rms_norm_kernel[grid](
        x, weight, out, num_rows, max(inner, 1), sx0, sx1, so0, so1, N, eps,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps, **pdl_launch(x.device),
    )
    return out


def fused_add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> None:
    """In place: ``residual <- x + residual``; ``x <- rmsnorm(residual) * weight``."""
    assert x.dim() == 2 and x.shape == residual.shape, (x.shape, residual.shape)
    T, N = x.shape
    assert weight.shape == (N,) and weight.stride(0) == 1
    assert x.stride(1) == 1 and residual.stride(1) == 1, "last dim must be contiguous"
    if T == 0:
        return
    block_r, block_n, num_warps = _launch_cfg(T, N)
    grid = (triton.cdiv(T, block_r),)
    _fused_add_rms_norm_kernel[grid](
        x, residual, weight, T, x.stride(0), residual.stride(0), N, eps,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps, **pdl_launch(x.device),
    )


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps) * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(new_x, new_residual)`` without touching the inputs."""
    new_res = (x.float() + residual.float()).to(residual.dtype)
    return rms_norm_ref(new_res, weight, eps).to(x.dtype), new_res
