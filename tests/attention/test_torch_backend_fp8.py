"""The torch (and cpu) attention backend over an FP8 (e4m3) KV cache: the reference path.

The fp8 run must equal, up to fp32 compute order, the same backend run over an fp32 cache
that holds the dequantized values (fp8 * scale), and stay within fp8 rounding of the run
over the unquantized K/V.
"""
from __future__ import annotations

import pytest
import torch

from miniinfer.attention.cpu_backend import CPUAttentionBackend
from miniinfer.attention.torch_backend import TorchAttentionBackend, store_kv_cache
from miniinfer.kernels._common import FP8_E4M3_MAX, dequantize_fp8, quantize_fp8

from test_torch_backend import _case

FP8 = torch.float8_e4m3fn


def _run(backend_cls, case, cache_dtype, k_scale=1.0, v_scale=1.0, v_mul=1.0):
    q, k_new, v_new, k_cache, v_cache, meta = case[:6]
    backend = backend_cls()
    backend.k_scale, backend.v_scale = k_scale, v_scale
    if cache_dtype == FP8:
        kc, vc = quantize_fp8(k_cache, k_scale), quantize_fp8(v_cache * v_mul, v_scale)
    else:
        kc, vc = k_cache.to(cache_dtype), (v_cache * v_mul).to(cache_dtype)
    out = backend.forward(q, k_new, v_new * v_mul, kc, vc, meta, 0.25)
    return out, kc, vc


@pytest.mark.parametrize("backend_cls", [TorchAttentionBackend, CPUAttentionBackend])
@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.25, 4.0)])
def test_fp8_cache_equals_dequantized_fp32_cache(backend_cls, k_scale, v_scale):
    case = _case(torch.float32, seed=3)
    out8, kc8, vc8 = _run(backend_cls, case, FP8, k_scale, v_scale)
    assert kc8.dtype == FP8 and vc8.dtype == FP8
    # the same step over an fp32 cache holding exactly the dequantized values (new tokens too)
    q, k_new, v_new, k_cache, v_cache, meta = case[:6]
    kc = dequantize_fp8(quantize_fp8(k_cache, k_scale), k_scale)
    vc = dequantize_fp8(quantize_fp8(v_cache, v_scale), v_scale)
    k_dq = dequantize_fp8(quantize_fp8(k_new, k_scale), k_scale)
    v_dq = dequantize_fp8(quantize_fp8(v_new, v_scale), v_scale)
    ref = TorchAttentionBackend().forward(q, k_dq, v_dq, kc, vc, meta, 0.25)
    torch.testing.assert_close(out8, ref, atol=2e-5, rtol=2e-5)
    # the new tokens landed quantized in their slots
    slots = meta.slot_mapping
    torch.testing.assert_close(kc8.flatten(0, 1)[slots].float() * k_scale, k_dq, atol=0, rtol=0)
    # and the whole thing is within fp8 rounding of the unquantized run
    exact = TorchAttentionBackend().forward(q, k_new, v_new, k_cache.clone(), v_cache.clone(), meta, 0.25)
    rel = ((out8 - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.05, rel


def test_fp8_store_saturates_instead_of_nan():
    """Values beyond 448 * scale clip to +-448 in the cache (e4m3fn has no inf)."""
    k = torch.tensor([[[1000.0, -1000.0, 448.0, 1.0]]])
    cache = torch.zeros(2, 2, 1, 4, dtype=FP8)
    store_kv_cache(k, k.clone(), cache, cache.clone(), torch.tensor([3]), k_scale=1.0, v_scale=1.0)
    assert cache[1, 1, 0].float().tolist() == [FP8_E4M3_MAX, -FP8_E4M3_MAX, 448.0, 1.0]
    store_kv_cache(k, k.clone(), cache, cache.clone(), torch.tensor([0]), k_scale=4.0, v_scale=1.0)
    assert cache[0, 0, 0].float().tolist() == [256.0, -256.0, 112.0, 0.25]  # x / 4 rounded: 250 -> 256
    assert not torch.isnan(cache.float()).any()


def test_fp8_large_values_need_a_scale():
    """V of magnitude ~1000: v_scale 1.0 saturates (large error), 8.0 fits (fp8 rounding only)."""
    case = _case(torch.float32, seed=4)
    exact, _, _ = _run(TorchAttentionBackend, case, torch.float32, v_mul=1000.0)
    clipped, _, _ = _run(TorchAttentionBackend, case, FP8, 1.0, 1.0, v_mul=1000.0)
    scaled, _, _ = _run(TorchAttentionBackend, case, FP8, 1.0, 8.0, v_mul=1000.0)

    def rel(x):
        return ((x - exact).norm() / exact.norm()).item()
    assert rel(scaled) < 0.05 < rel(clipped)
