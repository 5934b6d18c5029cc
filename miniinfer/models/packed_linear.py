"""CPU fp32 linears with weights laid out for fast kernels: oneDNN's blocked fp32 layout,
or GGUF Q4_1 / Q8_0 blocks kept quantized for ``kernels/cpu_kernels.c``.

At decode batch sizes a CPU step streams every weight once; plain ``x @ W.T`` (MKL sgemm)
uses a fraction of the memory bandwidth there, while oneDNN with the weight laid out ahead
of time for its kernels runs the same GEMMs ~2x faster (SmolLM2 shapes, 16 rows) and gives
the same greedy tokens (see docs/BENCHMARKS.md §8). bf16 weights are left alone: oneDNN's prepacked bf16
path measured slower than the plain bf16 matmul on AVX512-BF16.
"""
from __future__ import annotations

import torch
from torch import nn

from miniinfer.kernels import cpu_kernels


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def gguf_kernels_available(device: torch.device, dtype: torch.dtype, tp=None) -> bool:
    """GGUF weights kept quantized: CPU, fp32 activations, one rank, and the kernels build here."""
    if device.type != "cpu" or dtype != torch.float32 or (tp is not None and tp.enabled):
        return False
    return cpu_kernels.available()


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with W reordered once for oneDNN's kernels (tuned for a batch of
    ``batch_hint`` rows, correct for any); drop-in for an ``nn.Linear``. Inputs and outputs
    stay ordinary dense tensors (converting activations to oneDNN tensors and back cost
    more than the packing saved)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int = 16):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_hint)
        self.register_buffer("weight", packed, persistent=False)
        self.bias = None if bias is None else bias.detach().clone()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias,
                                               "none", [], "")
        return y.view(*lead, self.out_features)


class QuantizedLinear(nn.Module):
    """``y = x @ W.T + b`` with W kept in its GGUF format (Q4_1: 0.625 bytes a weight, Q8_0:
    1.06, instead of 4) for the C kernels (AVX-512, AVX2 or portable, one packed layout for
    all). fp32 activations and sums by default, so results match an fp32 GEMM over the
    dequantized weights up to summation order; with ``int8_min_rows`` set, a Q4_1 call of at
    least that many rows quantizes x to int8 per 32-block and uses integer dot products
    (``cpu_kernels.gemm(..., int8=True)``: ~3x faster on AVX-512 VNNI, relative error ~5e-3;
    each output row has the same bits whatever the call's other rows)."""

    def __init__(self, blocks: torch.Tensor, in_features: int, bias: torch.Tensor | None, fmt: str,
                 int8_min_rows: int | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, blocks.shape[0], fmt
        self.int8_min_rows = int8_min_rows
        self.register_buffer("packed", cpu_kernels.repack(blocks, in_features, fmt), persistent=False)
        self.bias = None if bias is None else bias.detach().clone()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> QuantizedLinear:
        """A Q8_0 layer for a float ``weight [N, K]`` (N % 16 == 0, K % 32 == 0: see
        :func:`kernel_fits`), quantized by :func:`quantize_q8_0`."""
        return cls(quantize_q8_0(weight), weight.shape[1], bias, "Q8_0")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        int8 = self.int8_min_rows is not None and x.shape[0] >= self.int8_min_rows
        y = cpu_kernels.gemm(x, self.packed, self.out_features, self.in_features, self.fmt, int8=int8)
        if self.bias is not None:
            y += self.bias
        return y.view(*lead, self.out_features)


# Every row count, batch-1 decode included: a speculative verify's rows then get the decode's
# bits (int8 rows don't depend on their call's size), and one row is faster in int8 too.
INT8_MIN_ROWS = 1


def use_int8_activations(model: nn.Module, min_rows: int | None = INT8_MIN_ROWS) -> int:
    """Let every Q4_1 :class:`QuantizedLinear` in ``model`` run calls of at least ``min_rows``
    rows with int8 activations (None: fp32 again); returns how many layers it set. With
    ``min_rows`` > 1, calls of fewer rows stay fp32: greedy output with speculative decoding
    may then differ from without (its verify rows int8, the decode rows fp32)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.fmt == "Q4_1"]
    for m in layers:
        m.int8_min_rows = min_rows
    return len(layers)


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """float ``[N, K]`` (K % 32 == 0) -> GGUF Q8_0 rows ``uint8 [N, K/32 * 34]`` (per 32-block
    ``d = max|w| / 127`` as fp16, ``q = round(w / d)``): gguf-py's quantizer, bit-exact with
    llama.cpp's ``quantize_row_q8_0_ref``. Error <= d/2 a weight (~1/254 of a block's max)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    w = weight.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return torch.from_numpy(quantize(w, GGMLQuantizationType.Q8_0))


def kernel_fits(rows: int, in_features: int) -> bool:
    return rows % cpu_kernels.ROWS == 0 and in_features % cpu_kernels.BLOCK == 0


def pack_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model`` by a :class:`PackedLinear`; returns how many."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear.from_linear(child))
    return len(swaps)
