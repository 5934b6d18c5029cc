"""CPU decode steps in one C call (models/cpu_decode.py): the same tokens and log-probabilities
as the per-module path, on every kernel path this CPU runs, for Llama (the embedded GGUF),
Qwen2 (q/k/v bias) and Qwen3 (q/k norms) layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers import random_prompts
from miniinfer import SamplingParams
from miniinfer.kernels import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the C kernels did not build (no gcc/cc?)")
PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)


def _run(llm, prompts, fused: bool):
    llm.engine.runner.model.cpu_decode = None if fused else False
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        for lx, ly in zip(x.logprobs, y.logprobs):
            assert lx.keys() == ly.keys()
            for t in lx:
                assert abs(lx[t].logprob - ly[t].logprob) < 1e-4


def _quantize_projections(model, fmt: str, seed: int) -> None:
    """Every projection of every layer becomes a QuantizedLinear over random GGUF blocks."""
    from miniinfer.models.packed_linear import QuantizedLinear
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            dense = getattr(parent, name)
            n, k = dense.weight.shape
            raw = rng.integers(0, 256, (n, k // 32, cpu_kernels.BLOCK_BYTES[fmt]), dtype=np.uint8)
            raw[:, :, 0:2] = rng.uniform(-0.05, 0.05, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
            if fmt == "Q4_1":
                raw[:, :, 2:4] = rng.uniform(-0.2, 0.2, (n, k // 32, 1)).astype(np.float16).view(np.uint8)
            bias = None if dense.bias is None else dense.bias.detach()
            setattr(parent, name, QuantizedLinear(torch.from_numpy(raw.reshape(n, -1)), k, bias, fmt))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_smollm2_fused_decode_equals_module_path(smol_llm, isa):
    if isa not in cpu_kernels.supported_isas():
        pytest.skip(f"this CPU does not run the {isa} kernels (it runs {cpu_kernels.supported_isas()})")
    qs = ["Write a story about a dragon.", "What is 2+2?", "Name three colors of the rainbow."]
    prompts = [smol_llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in qs]
    with cpu_kernels.use_isa(isa):
        fused = _run(smol_llm, prompts, True)
        from miniinfer.models.cpu_decode import CPUDecodePlan
        assert isinstance(smol_llm.engine.runner.model.cpu_decode, CPUDecodePlan)
        _assert_same(fused, _run(smol_llm, prompts, False))
    smol_llm.engine.runner.model.cpu_decode = None


@pytest.mark.parametrize("name,fmt", [("qwen2", "Q4_1"), ("qwen3", "Q8_0"), ("llama", "Q4_1")])
def test_tiny_models_fused_decode_equals_module_path(tiny_llm, name, fmt):
    from miniinfer.models.cpu_decode import CPUDecodePlan
    llm = tiny_llm(name, cpu_packed_weights=False)
    model = llm.engine.runner.model
    _quantize_projections(model, fmt, seed=3)
    prompts = random_prompts(5, seed=11, min_len=3, max_len=40)
    fused = _run(llm, prompts, True)
    assert isinstance(model.cpu_decode, CPUDecodePlan)
    _assert_same(fused, _run(llm, prompts, False))


def test_dense_weights_keep_the_module_path(tiny_llm):
    llm = tiny_llm("qwen2")
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert llm.engine.runner.model.cpu_decode is False
