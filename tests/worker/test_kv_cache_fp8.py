"""FP8 KV cache option: EngineConfig validation, the cache dtype, block sizing and allocation."""
from __future__ import annotations

import types

import pytest
import torch

from miniinfer.config import EngineConfig
from miniinfer.worker import kv_cache

FP8 = torch.float8_e4m3fn


# --- EngineConfig.kv_cache_dtype -------------------------------------------------------
@pytest.mark.parametrize("name", ["auto", "fp8", "fp8_e4m3"])
def test_config_accepts_on_cuda(name):
    assert EngineConfig(device="cuda", kv_cache_dtype=name).kv_cache_dtype == name


def test_config_default_is_auto():
    assert EngineConfig(device="cpu").kv_cache_dtype == "auto"


@pytest.mark.parametrize("name", ["fp16", "int8", "fp8_e5m2", "FP8", ""])
def test_config_rejects_unknown(name):
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of auto, fp8, fp8_e4m3"):
        EngineConfig(device="cuda", kv_cache_dtype=name)


@pytest.mark.parametrize("name", ["fp8", "fp8_e4m3"])
def test_config_rejects_fp8_on_cpu(name):
    with pytest.raises(ValueError, match="kv_cache_dtype.*GPU option"):
        EngineConfig(device="cpu", kv_cache_dtype=name)


def test_cli_flag_maps_to_the_field():
    import argparse
    from miniinfer.entrypoints import cli
    p = argparse.ArgumentParser()
    cli.add_engine_args(p)
    args = p.parse_args(["--device", "cuda", "--kv-cache-dtype", "fp8"])
    assert cli.engine_config_from_args(args).kv_cache_dtype == "fp8"


# --- dtype, sizing ----------------------------------------------------------------------
def test_cache_torch_dtype():
    assert kv_cache.kv_cache_torch_dtype("auto", torch.bfloat16, "cuda") == torch.bfloat16
    assert kv_cache.kv_cache_torch_dtype("auto", torch.bfloat16, "cpu") == torch.float32
    assert kv_cache.kv_cache_torch_dtype("fp8", torch.bfloat16, "cuda") == FP8
    assert kv_cache.kv_cache_torch_dtype("fp8_e4m3", torch.float16, "cuda") == FP8
    with pytest.raises(ValueError, match="GPU option"):
        kv_cache.kv_cache_torch_dtype("fp8", torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_cache.kv_cache_torch_dtype("int4", torch.bfloat16, "cuda")


def test_fp8_block_bytes_half_and_blocks_double():
    """The runner's sizing (bytes_per_block then num_blocks_for_budget): one budget holds
    twice the fp8 blocks of bf16 (the max_num_seqs cap far away)."""
    shape = dict(block_size=16, num_layers=24, num_kv_heads=2, head_dim=64)
    bf16 = kv_cache.bytes_per_block(**shape, dtype=torch.bfloat16)
    fp8 = kv_cache.bytes_per_block(**shape, dtype=FP8)
    assert bf16 == 2 * 24 * 16 * 2 * 64 * 2 and fp8 * 2 == bf16
    budget = 3 << 30
    n_bf16 = kv_cache.num_blocks_for_budget(budget, bf16, 32768, 16, 256)
    n_fp8 = kv_cache.num_blocks_for_budget(budget, fp8, 32768, 16, 256)
    assert n_bf16 == budget // bf16 and n_fp8 == 2 * n_bf16


def _fake_model(num_layers: int):
    from miniinfer.attention.torch_backend import TorchAttentionBackend
    backend = TorchAttentionBackend()
    layers = [types.SimpleNamespace(self_attn=types.SimpleNamespace(backend=backend)) for _ in range(num_layers)]
    return types.SimpleNamespace(layers=layers), backend


def test_allocate_fp8_cache_dtype_size_and_scales():
    model, backend = _fake_model(3)
    layout = kv_cache.make_layout(10, 16, 3, 2, 64, FP8, 4096)
    ref_layout = kv_cache.make_layout(10, 16, 3, 2, 64, torch.bfloat16, 4096)
    caches = kv_cache.allocate_kv_cache(model, layout, torch.device("cpu"))
    assert caches.dtype == FP8 and caches.shape == (2, 3, 10, 16, 2, 64)
    assert caches.nbytes * 2 == torch.empty(ref_layout.shape, dtype=torch.bfloat16).nbytes
    assert model.layers[1].self_attn.k_cache.dtype == FP8
    assert model.layers[2].self_attn.v_cache.data_ptr() == caches[1, 2].data_ptr()
    assert (backend.k_scale, backend.v_scale) == (1.0, 1.0)  # vLLM's uncalibrated default
    scaled = kv_cache.KVCacheLayout(10, 16, 3, 2, 64, FP8, 4096, k_scale=0.5, v_scale=2.0)
    kv_cache.allocate_kv_cache(model, scaled, torch.device("cpu"))
    assert (backend.k_scale, backend.v_scale) == (0.5, 2.0)


def test_allocate_bf16_cache_leaves_scales():
    model, backend = _fake_model(2)
    layout = kv_cache.KVCacheLayout(4, 16, 2, 2, 64, torch.bfloat16, 64, k_scale=3.0, v_scale=3.0)
    assert kv_cache.allocate_kv_cache(model, layout, torch.device("cpu")).dtype == torch.bfloat16
    assert (backend.k_scale, backend.v_scale) == (1.0, 1.0)
