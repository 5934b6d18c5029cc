"""``Linear``: an ``nn.Linear`` whose decode-sized CUDA calls use the Triton GEMV.

    from miniinfer.models.linear import Linear
    self.o_proj = Linear(q_size, hidden, bias=False)   # drop-in for nn.Linear

Same constructor and parameters as ``nn.Linear`` (weight ``[out, in]``, optional bias
``[out]``), so weight loading is unchanged. ``forward`` runs
:func:`miniinfer.kernels.gemv.gemv` when the input is on CUDA, has at most
``GEMV_MAX_ROWS`` rows after flattening the leading dims, is bf16/fp16 like the weight, and
the weight is contiguous; otherwise (prefill, CPU, fp32, ...) it is ``F.linear`` exactly.

:func:`linear_silu_mul` is ``down_proj(silu(gate) * up)`` from the gate_up output; with
``MINIINFER_GEMV_SILU=1`` the SiLU-and-mul runs in the GEMV's prologue (one launch fewer per
MLP). **Off by default**: on an H200 (2026-11-30, Qwen2-7B bs-1 TPOT, same lease) it made the
step slower, 4.02 -> 4.24 ms — every program recomputes SiLU for its chunk of the 18,944-wide
input (exp + divide per element), which costs more than the launch it saves.

A/B switches, environment variables read at import: ``MINIINFER_GEMV=0`` disables the GEMV
path, ``MINIINFER_GEMV_SILU=1`` enables the fused prologue; tests and benchmarks may also set
``linear.GEMV_ENABLED`` / ``linear.SILU_MUL_FUSED`` at run time. Triton is imported lazily,
on the first CUDA call, so this module imports on CPU-only machines.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from miniinfer.models import ops

# Decode batch sizes up to this many rows take the GEMV kernel. H200 (benchmarks/gemv_bench.py,
# 2026-11-30): one Qwen2-7B step's linears 1.14x faster than cuBLAS at M=1, 1.10x at 2, but
# 0.87x at 4 and 0.90x at 8 (the tensor-core path loses to cuBLAS there).
GEMV_MAX_ROWS = 2
GEMV_ENABLED: bool = os.environ.get("MINIINFER_GEMV", "1") != "0"
SILU_MUL_FUSED: bool = os.environ.get("MINIINFER_GEMV_SILU", "0") == "1"  # linear_silu_mul's prologue (off: slower)
_GEMV_DTYPES = (torch.bfloat16, torch.float16)


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.linear(x, weight)`` goes to the GEMV kernel (x ``[..., K]``)."""
    if not GEMV_ENABLED or not x.is_cuda or x.dim() == 0:
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (1 <= rows <= GEMV_MAX_ROWS and x.dtype in _GEMV_DTYPES and weight.dtype == x.dtype
            and weight.is_contiguous() and weight.is_cuda)


def _gemv(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          act: str | None = None) -> torch.Tensor:
    from miniinfer.kernels.gemv import gemv  # lazy: pulls in triton

    return gemv(x2d, weight, bias, act=act)


def _gemv_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return use_gemv(x, weight) and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))


def _gemv_nd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None = None):
    """The GEMV on x ``[..., K']`` flattened to 2-D rows -> ``[..., N]``."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    return _gemv(x2d, weight, bias, act).view(*lead, weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (x ``[..., K]``, weight ``[N, K]``) through the GEMV kernel
    when :func:`use_gemv` says so (also for weights that are not a ``Linear``'s, e.g. a tied
    LM head's embedding rows)."""
    if _gemv_fits(x, weight, bias):
        return _gemv_nd(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_silu_mul(gate_up: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(silu(gate) * up, weight, bias)``: ``gate_up [..., 2I]`` (gate in the first
    half, up in the second, as ``ops.silu_and_mul``), weight ``[N, I]`` -> ``[..., N]`` in
    gate_up's dtype. On the GEMV path (:func:`use_gemv`) the SiLU-and-mul is the kernel's
    prologue, rounded to the dtype as the separate kernel rounds it: the same result as
    ``linear(ops.silu_and_mul(gate_up), weight, bias)``; otherwise that, literally."""
    if (SILU_MUL_FUSED and gate_up.dim() > 0 and gate_up.shape[-1] == 2 * weight.shape[-1]
            and _gemv_fits(gate_up, weight, bias)):
        return _gemv_nd(gate_up, weight, bias, act="silu_mul")
    lead = gate_up.shape[:-1]  # the kernels take 2-D rows
    act = ops.silu_and_mul(gate_up.reshape(-1, gate_up.shape[-1]))
    return linear(act, weight, bias).view(*lead, weight.shape[0])


def silu_mul_linear(gate_up: torch.Tensor, proj: nn.Module) -> torch.Tensor:
    """``proj(silu_and_mul(gate_up))`` (an MLP's down projection): :func:`linear_silu_mul` when
    ``proj`` is a :class:`Linear`, else the module as is (CPU packed / quantized layers)."""
    if isinstance(proj, Linear):
        return linear_silu_mul(gate_up, proj.weight, proj.bias)
    return proj(ops.silu_and_mul(gate_up))


class Linear(nn.Linear):
    """``nn.Linear`` (same signature and parameters) with a GEMV fast path for <= GEMV_MAX_ROWS
    rows on CUDA; ``y [..., out] = x [..., in] @ weight^T + bias``, in x's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
